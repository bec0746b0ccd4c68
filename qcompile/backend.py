"""The `qcompile` torch.compile backend: qcompile's graph passes, then inductor.

`torch.compile(model, backend="qcompile")` finds this through the
`torch_dynamo_backends` entry point (pyproject), so nothing needs importing first;
the backend imports qcompile, which defines the `qcompile::` ops the graph calls.
Dynamo's graph of a quantized model calls those ops directly (its quantized linears'
forward; see runtime.py "torch.compile"); inductor compiles everything around them.

Two passes run on Dynamo's graph before inductor sees it: `share_quantize` (one
activation quantization per tensor and scheme) and, with `FUSE_ACTIVATION_QUANT`,
`fuse_act_quant` (the quantize ops become their reference torch ops, which inductor
fuses into the producing norm / modulation kernel). Inductor's cache keys on the graph
they produce. Inside inductor, on the post-grad ATen graph, qcompile's passes run as
one `CustomGraphPass` whose `uuid()` hashes the pass files' source, so inductor's FX
graph cache is invalidated exactly when a pass changes; a user's own post-grad pass,
if configured, runs after them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

PASS_FILES = ("share_quantize.py",)
# Let inductor fuse activation quantization into the kernel producing the activation
# (passes/fuse_act_quant.py); False keeps qcompile's own quantize kernels.
FUSE_ACTIVATION_QUANT = True


class QCompilePasses(CustomGraphPass):
    """qcompile's post-grad passes, in order, on inductor's graph."""

    def __init__(self, then: Any = None) -> None:
        self.then = then  # the user's configured post-grad pass, run last

    def __call__(self, graph: fx.Graph) -> None:
        from qcompile.passes.share_quantize import share_quantize

        share_quantize(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        folder = Path(sys.modules["qcompile.passes"].__file__).parent
        files = (*(str(folder / name) for name in PASS_FILES), __file__)
        if self.then is None:
            return get_hash_for_files(files), None
        if not hasattr(self.then, "uuid"):
            return None  # a user's plain-function pass: inductor then skips its cache
        return get_hash_for_files(files), self.then.uuid()


def backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor], **kwargs: Any):
    """torch.compile backend "qcompile": inductor with qcompile's passes."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    import qcompile.passes  # noqa: F401 - qcompile's ops and kernels, and the pass files
    from qcompile.passes.fuse_act_quant import fuse_act_quant
    from qcompile.passes.share_quantize import share_quantize

    share_quantize(gm.graph)
    if FUSE_ACTIVATION_QUANT:
        fuse_act_quant(gm.graph)
    gm.recompile()

    # torch.compile hands a named backend its `mode` and `options` as kwargs; for
    # inductor they are config patches (mode="max-autotune-no-cudagraphs", ...).
    mode, options = kwargs.pop("mode", None), kwargs.pop("options", None) or {}
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(options)
    then = patches.get("post_grad_custom_post_pass", config.post_grad_custom_post_pass)
    patches["post_grad_custom_post_pass"] = QCompilePasses(then=then)
    return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)
