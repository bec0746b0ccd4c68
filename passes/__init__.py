"""FX passes over an ExportedProgram; one transform per file, edited in place.

Order: `annotate_linears` → (`observe_activations`) → `smooth` → `fold_lowrank` →
`quantize_weights` → `lower_linears`. On the runtime's graph module (not the saved
program): `fuse_horizontal`. Under torch.compile (qcompile/backend.py):
`share_quantize`, `fuse_act_quant`.
"""

from qcompile.passes.annotate_linears import annotate_linears
from qcompile.passes.fold_lowrank import fold_lowrank
from qcompile.passes.lower_linears import lower_linears
from qcompile.passes.meta import SCHEME
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.passes.smooth import smooth

__all__ = [
    "SCHEME",
    "annotate_linears",
    "fold_lowrank",
    "lower_linears",
    "quantize_weights",
    "smooth",
]
