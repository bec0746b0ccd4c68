"""Capture a diffusers model's forward as an ExportedProgram.

Non-strict torch.export with dynamic batch/token/spatial dims and `return_dict=False`
fixed; the default export IR is kept (no decompositions: they would destroy
`aten.linear` and SDPA). The capture also records what the graph runtime needs to
route a later call: the forward's signature, which arguments were exported, and the
output type a `return_dict=True` call must be wrapped in.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from qcompile.errors import CaptureError
from qcompile.memory import release_freed_memory

logger = logging.getLogger(__name__)

RETURN_DICT = "return_dict"


@dataclass
class Capture:
    program: ExportedProgram
    signature: inspect.Signature
    input_names: tuple[str, ...]  # forward parameters passed to export, in order
    output_type: type | None  # what a return_dict=True call returns, if anything
    output_fields: tuple[str, ...]
    seconds: float


def capture(
    module: nn.Module,
    example_inputs: dict[str, Any],
    dynamic_shapes: dict[str, Any] | None = None,
) -> Capture:
    """Export `module` on `example_inputs` (a kwargs dict for its forward).

    Without `dynamic_shapes`, dynamism is discovered: a first export marks every dim
    `Dim.AUTO`; the dims it leaves symbolic are re-exported as explicit `Dim(min=1)`
    so that size-1 calls (batch 1) stay on the graph.
    """
    signature = inspect.signature(module.forward)
    _check_inputs(module, signature, example_inputs)
    # A real call's kwargs often carry return_dict; the capture fixes it (False) itself.
    example_inputs = {k: v for k, v in example_inputs.items() if k != RETURN_DICT}
    kwargs = dict(example_inputs)
    has_return_dict = RETURN_DICT in signature.parameters
    if has_return_dict:
        kwargs[RETURN_DICT] = False
    logger.info("capturing %s with torch.export ...", type(module).__name__)
    start = time.perf_counter()
    with torch.no_grad():
        if dynamic_shapes is None:
            program = _export_discovering_dims(module, kwargs)
        else:
            specs = dict(dynamic_shapes)
            if has_return_dict:
                specs[RETURN_DICT] = None
            program = _export(module, kwargs, specs)
        output_type, output_fields = _output_type(module, example_inputs, has_return_dict)
    release_freed_memory()  # export and the probe above free far more than they keep
    seconds = time.perf_counter() - start
    logger.info("captured %s in %.1f s", type(module).__name__, seconds)
    return Capture(
        program=program,
        signature=signature,
        input_names=tuple(kwargs),
        output_type=output_type,
        output_fields=output_fields,
        seconds=seconds,
    )


def _check_inputs(module: nn.Module, signature: inspect.Signature, inputs: Any) -> None:
    if not isinstance(inputs, dict) or not inputs:
        raise CaptureError(
            f"example_inputs for {type(module).__name__} must be a non-empty dict of the "
            f"forward's keyword arguments, got {type(inputs).__name__}"
        )
    params = signature.parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [name for name in inputs if name not in params and not takes_var_kw]
    if unknown:
        raise CaptureError(
            f"example_inputs names {unknown} that {type(module).__name__}.forward does not "
            f"take; its parameters are {list(params)}"
        )


def _export(module: nn.Module, kwargs: dict[str, Any], dynamic_shapes: Any) -> ExportedProgram:
    try:
        return torch.export.export(module, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {exc}\n"
            "Check that example_inputs match a real call of the model (batch and token "
            "counts of at least 2 for dims that should stay dynamic)."
        ) from exc


def _export_discovering_dims(module: nn.Module, kwargs: dict[str, Any]) -> ExportedProgram:
    leaves, spec = pytree.tree_flatten(kwargs)
    auto = [
        {i: Dim.AUTO for i in range(leaf.dim())} if isinstance(leaf, torch.Tensor) else None
        for leaf in leaves
    ]
    program = _export(module, kwargs, pytree.tree_unflatten(auto, spec))
    values = _user_input_values(program)
    symbols = [
        {
            i: size.node.expr
            for i, size in enumerate(value.shape)
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol
        }
        if isinstance(value, torch.Tensor)
        else {}
        for value in values
    ]
    every = {sym for dims in symbols for sym in dims.values()}
    batch_like = {dims[0] for dims in symbols if 0 in dims}
    # Widen every dynamic dim to size 1; if the model constrains some (spatial dims
    # often do), widen only the leading (batch-like) ones; else keep the AUTO program.
    for widen in (every, batch_like):
        if not widen:
            continue
        dims = _explicit_dims(widen, program.range_constraints)
        specs = [
            {i: dims.get(sym, Dim.AUTO) for i, sym in per_leaf.items()} or None
            for per_leaf in symbols
        ]
        try:
            return _export(module, kwargs, pytree.tree_unflatten(specs, spec))
        except CaptureError as exc:
            logger.info("could not widen %d dims to size 1: %s", len(widen), exc)
    logger.warning(
        "%s: dynamic dims could not be widened to size 1; calls with a size-1 dim will "
        "run the eager fallback",
        type(module).__name__,
    )
    return program


def _explicit_dims(symbols: set, bounds: dict) -> dict[Any, Dim]:
    dims = {}
    for index, sym in enumerate(sorted(symbols, key=str)):
        upper = finite_int(bounds[sym].upper) if sym in bounds else None
        dims[sym] = Dim(f"dim{index}", min=1, **({} if upper is None else {"max": upper}))
    return dims


def finite_int(value: Any) -> int | None:
    """A range bound as an int; None for ±infinity (sympy oo or torch's int_oo)."""
    return int(value) if isinstance(value, (int, sympy.Integer)) else None


def _user_input_values(program: ExportedProgram) -> list[Any]:
    """meta["val"] of each user-input placeholder (constants included), in input order."""
    nodes = [n for n in program.graph.nodes if n.op == "placeholder"]
    return [
        node.meta.get("val")
        for node, spec in zip(nodes, program.graph_signature.input_specs, strict=True)
        if spec.kind is InputKind.USER_INPUT
    ]


def example_inputs_of(
    program: ExportedProgram,
    dtype: torch.dtype,
    device: torch.device,
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword inputs shaped like `program`'s capture (each symbolic dim at the size it
    was traced with, on `device`, floating tensors in `dtype` or, for top-level
    arguments `dtypes` names, in that dtype; seeded values) and the dynamic shapes that
    declare the same dims with the same bounds: what capturing the model again in
    another dtype needs, for any model, without its family."""
    gen = torch.Generator().manual_seed(0)
    bounds = program.range_constraints
    dims: dict[Any, Any] = {}
    leaves, specs = [], []
    for value in _user_input_values(program):
        if not isinstance(value, torch.Tensor):
            leaves.append(value)
            specs.append(None)
            continue
        shape, spec = [], {}
        for i, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                shape.append(int(size))
                continue
            expr = size.node.expr
            shape.append(int(size.node.hint))
            if expr.is_Symbol and expr in bounds:
                upper = finite_int(bounds[expr].upper)
                limits = {"min": int(bounds[expr].lower)}
                if upper is not None:
                    limits["max"] = upper
                # A dim that reaches 1 was declared by name (capture widens batch-like
                # dims so); the others were left to Dim.AUTO, and stay so: torch.export
                # finds their relations again (a height divisible by the UNet's
                # downsampling), which a named Dim would have to spell out.
                if limits["min"] <= 1:
                    spec[i] = dims.setdefault(expr, Dim(f"dim{len(dims)}", **limits))
                else:
                    spec[i] = Dim.AUTO(**limits)
            else:  # derived (2 * s0, ...)
                spec[i] = Dim.AUTO
        if value.is_floating_point():
            tensor = torch.randn(shape, generator=gen).to(dtype)
        else:
            tensor = torch.zeros(shape, dtype=value.dtype)
        leaves.append(tensor.to(device))
        specs.append(spec or None)
    in_spec = program.call_spec.in_spec
    _, kwargs = pytree.tree_unflatten(leaves, in_spec)
    for name, want in (dtypes or {}).items():
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].is_floating_point():
            kwargs[name] = kwargs[name].to(want)
    _, shapes = pytree.tree_unflatten(specs, in_spec)
    kwargs.pop(RETURN_DICT, None)
    shapes.pop(RETURN_DICT, None)
    return kwargs, shapes


def _output_type(
    module: nn.Module, example_inputs: dict[str, Any], has_return_dict: bool
) -> tuple[type | None, tuple[str, ...]]:
    """The output class of a return_dict=True call (e.g. Transformer2DModelOutput).

    The call runs on fake tensors: a real one would compute a whole forward (and, on a
    quantized model, dequantize each weight) only to learn a type. A forward that reads
    tensor values (`.item()`), which fake tensors cannot give, is called for real."""
    if not has_return_dict:
        return None, ()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = module(**example_inputs, return_dict=True)
    except (DataDependentOutputException, DynamicOutputShapeException):
        out = module(**example_inputs, return_dict=True)
    if isinstance(out, dict):  # diffusers BaseOutput is an OrderedDict dataclass
        return type(out), tuple(k for k, v in out.items() if v is not None)
    return None, ()
