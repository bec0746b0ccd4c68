"""FX passes over an ExportedProgram; one transform per file, edited in place.

Order: `annotate_linears` → `quantize_weights` → `lower_linears`.
"""

from qcompile.passes.annotate_linears import annotate_linears
from qcompile.passes.lower_linears import lower_linears
from qcompile.passes.meta import SCHEME
from qcompile.passes.quantize_weights import quantize_weights

__all__ = ["SCHEME", "annotate_linears", "lower_linears", "quantize_weights"]
