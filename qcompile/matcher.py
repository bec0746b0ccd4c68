"""Which forward calls fit a captured program (`CallMatcher`), and their flat inputs.

A call fits when it binds to the forward's signature with the captured arguments
(others at their defaults), has the capture's pytree structure, tensor dtypes and
ranks, static dims equal and symbolic dims consistent and in range, and torch.export's
own guards pass. Integer timesteps are cast at the boundary (see `_coerce`).
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from qcompile.capture import RETURN_DICT, Capture, finite_int

EXACT_INT_LIMIT = 1 << 24  # integers below it are exact in float32 (timesteps are < 1000)
MAX_CAST_NUMEL = 4096  # integer inputs cast at the boundary are timestep-sized
LORA_SCALE_KWARGS = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs")


def _argument_name(path: tuple) -> str:
    """A flat input's key path in (args, kwargs) as `name['key']...`, e.g. 'timestep'."""
    if len(path) >= 2 and isinstance(path[1], pytree.MappingKey):
        return f"{path[1].key}{pytree.keystr(path[2:])}"
    return f"input {pytree.keystr(path)}"


class _Tensor:
    """What a tensor input must look like: dtype and, per dim, int | Symbol | Expr."""

    def __init__(self, fake: torch.Tensor) -> None:
        self.dtype = fake.dtype
        self.dims = [d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in fake.shape]


class _Const:
    def __init__(self, value: Any) -> None:
        self.value = value


class CallMatcher:
    """Decides whether a forward call fits a captured program, and flattens it if so."""

    def __init__(self, captured: Capture, guards: bool = True) -> None:
        program = captured.program
        self.program = program
        self.signature = captured.signature
        self.input_names = captured.input_names
        sig = program.graph_signature
        nodes = [n for n in program.graph.nodes if n.op == "placeholder"]
        self._leaves = [
            _Tensor(n.meta["val"])
            if isinstance(n.meta.get("val"), torch.Tensor)
            else _Const(n.meta.get("val"))
            for n, spec in zip(nodes, sig.input_specs, strict=True)
            if spec.kind is InputKind.USER_INPUT
        ]
        self._ranges = {
            sym: (finite_int(vr.lower) or 0, finite_int(vr.upper))
            for sym, vr in program.range_constraints.items()
        }
        self._guards = getattr(program.module(), "_guards_fn", None) if guards else None
        # Each flat input's argument, for reasons a user can act on ("timestep", ...).
        indexed = pytree.tree_unflatten(list(range(len(self._leaves))), program.call_spec.in_spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(indexed)[0]]
        self._names = [_argument_name(path) for path in paths]

    def lora_scale(self, args: tuple, kwargs: dict) -> float:
        """The LoRA `scale` a pipeline passes in `joint_attention_kwargs` and the like
        (diffusers' forward multiplies every adapter's scaling by it), else 1."""
        arguments = self.signature.bind(*args, **kwargs).arguments
        for name in LORA_SCALE_KWARGS:
            value = arguments.get(name)
            if isinstance(value, dict) and "scale" in value:
                return float(value["scale"])
        return 1.0

    def match(self, args: tuple, kwargs: dict) -> str | tuple[list, torch.device, bool]:
        """(flat inputs, device, return_dict) when the call fits; else the reason."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return f"arguments do not bind: {exc}"
        bound.apply_defaults()
        values = dict(bound.arguments)
        return_dict = bool(values.pop(RETURN_DICT, True))
        for name, param in self.signature.parameters.items():
            if name in self.input_names or name == RETURN_DICT:
                continue
            value = values.get(name, param.default)
            if param.kind is param.VAR_KEYWORD or param.kind is param.VAR_POSITIONAL:
                if value:
                    return f"extra arguments {name}={value!r}"
            elif not _is_unset(value, param.default) and not _only_lora_scale(name, value):
                return f"argument {name!r} was not captured"
        inputs = {n: (False if n == RETURN_DICT else values.get(n)) for n in self.input_names}
        flat, spec = pytree.tree_flatten(((), inputs))
        if spec != self.program.call_spec.in_spec:
            return "argument structure differs from the capture"
        device = next((t.device for t in flat if isinstance(t, torch.Tensor)), None)
        flat = [self._coerce(x, want, device) for x, want in zip(flat, self._leaves, strict=True)]
        reason = self._match_leaves(flat)
        if reason:
            return reason
        if self._guards is not None:
            try:
                self._guards(*flat)
            except AssertionError as exc:
                return f"export guard failed: {exc}"
        tensors = [leaf for leaf in flat if isinstance(leaf, torch.Tensor)]
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            return f"inputs on several devices {sorted(map(str, devices))}"
        return flat, devices.pop(), return_dict

    @staticmethod
    def _coerce(leaf: Any, want: _Tensor | _Const, device: torch.device | None) -> Any:
        """Integer timesteps where a float tensor was captured, cast at the boundary.

        DDIM, DPM++, UniPC, LCM and TCD hand the UNet int64 timesteps (a Python int
        from some pipelines); the model's first use of them is a cast to float, so
        casting here is exact while the values are exactly representable (|t| < 2^24),
        which is checked. Anything else is left for `_match_leaves` to judge.
        """
        if not isinstance(want, _Tensor) or not want.dtype.is_floating_point:
            return leaf
        if isinstance(leaf, int) and not isinstance(leaf, bool) and not want.dims:
            if abs(leaf) < EXACT_INT_LIMIT:  # on the other inputs' device
                return torch.tensor(leaf, dtype=want.dtype, device=device)
            return leaf
        if (
            isinstance(leaf, torch.Tensor)
            and not leaf.dtype.is_floating_point
            and leaf.dtype is not torch.bool
            and leaf.dim() == len(want.dims)
            and leaf.numel() <= MAX_CAST_NUMEL
            and (leaf.numel() == 0 or int(leaf.abs().max()) < EXACT_INT_LIMIT)
        ):
            return leaf.to(want.dtype)
        return leaf

    def _match_leaves(self, flat: list) -> str:
        bindings: dict[sympy.Symbol, int] = {}
        derived = []
        for name, leaf, want in zip(self._names, flat, self._leaves, strict=True):
            if isinstance(want, _Const):
                if isinstance(leaf, torch.Tensor) or not _same_constant(leaf, want.value):
                    return f"{name} is {leaf!r}, captured as constant {want.value!r}"
                continue
            if not isinstance(leaf, torch.Tensor):
                return f"{name} is {type(leaf).__name__}, captured as a tensor"
            if leaf.dtype != want.dtype or leaf.dim() != len(want.dims):
                return (
                    f"{name} is {leaf.dtype} rank {leaf.dim()}, captured as "
                    f"{want.dtype} rank {len(want.dims)}"
                )
            for size, dim in zip(leaf.shape, want.dims, strict=True):
                if isinstance(dim, int):
                    if size != dim:
                        return f"{name} has shape {tuple(leaf.shape)}; a dim is static"
                elif dim.is_Symbol:
                    if bindings.setdefault(dim, size) != size:
                        return f"{name}: dim {dim} is {size} and {bindings[dim]}"
                else:
                    derived.append((name, dim, size))
        for sym, size in bindings.items():
            low, high = self._ranges.get(sym, (0, None))
            if size < low or (high is not None and size > high):
                return f"dim {sym}={size} is outside its captured range [{low}, {high}]"
        for name, expr, size in derived:
            if expr.free_symbols - bindings.keys() or int(expr.xreplace(bindings)) != size:
                return f"{name}: dim {expr} does not hold for size {size}"
        return ""


def _is_unset(value: Any, default: Any) -> bool:
    """An uncaptured argument left at its default. Pipelines pass `{}` for kwargs-dicts
    such as `joint_attention_kwargs` whose default is None; diffusers forwards treat the
    two alike, so an empty container counts as unset too."""
    if default is None and isinstance(value, (dict, list, tuple)) and not value:
        return True
    return _same_constant(value, default)


def _only_lora_scale(name: str, value: Any) -> bool:
    """`joint_attention_kwargs={"scale": s}` and the like, which pipelines pass for LoRA:
    the scale only reaches peft's layers, whose branches the runtime builds with it
    (`CallMatcher.lora_scale`)."""
    return name in LORA_SCALE_KWARGS and isinstance(value, dict) and set(value) == {"scale"}


def _same_constant(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False
