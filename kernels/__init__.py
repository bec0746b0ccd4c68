"""qcompile's runtime ops (``torch.ops.qcompile.*``), their references, and kernels.

Importing this package registers the ops; a saved ``.pt2`` that uses them loads only
after it (``import qcompile`` does it).
"""

from qcompile.kernels import ops

__all__ = ["ops"]
