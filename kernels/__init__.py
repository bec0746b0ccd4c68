"""qcompile's runtime ops (``torch.ops.qcompile.*``), their references, and kernels.

Importing this package registers the ops (CPU: the references in ``reference/``; CUDA:
the Triton kernels, through ``cuda.py``); a saved ``.pt2`` that uses them loads only
after it (``import qcompile`` does it). Triton itself is imported on the first CUDA
launch.
"""

# This folder installs as qcompile.kernels. Run from the repository root, Python also
# finds it as a top-level `kernels`, which transformers probes for (Hugging Face's kernel
# hub package) by importing it. Under that name it must stay inert: no qcompile import
# (which would register the quantizer as a side effect) and no __version__ (so the probe
# reports the hub package as absent).
if __name__ == "qcompile.kernels":
    from qcompile.kernels import cuda, ops

    __all__ = ["cuda", "ops"]
