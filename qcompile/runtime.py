"""The graph runtime: runs the lowered program in place of a model's forward.

Decision (DESIGN.md "open"): the program is kept weightless; on every call its
parameters and buffers are read by FQN from the live module, so the graph and the
eager fallback share one copy of every tensor and follow `module.to(device)`. A call
runs the graph when it matches the capture: same forward arguments (others at their
defaults), same pytree structure, tensor dtypes and ranks, static dims equal, dynamic
dims inside their ranges and consistent, and torch.export's own guards pass
(divisibility, ...). An uncaptured argument must be at its default; an empty
kwargs-dict where the default is None counts as the default. Anything else runs the
module's own forward, whose quantized linears call the same ops. `last_path`,
`last_reason` and `calls` record the choice.

The graph is never stale. peft LoRA layers around the graph's linears are the one
change it follows: their adapters ride as a 16-bit branch beside each linear, read
live on every call (`qcompile.lora_graph`). After any other submodule change (a layer
replaced, an adapter on a layer the graph lacks) calls run the module's own forward,
which honours it, until the original modules are back. A call that needs autograd
runs the forward too (the program holds no backward). Under torch.compile the
module's forward is what Dynamo traces: the matcher is plain Python over the call,
and the qcompile ops inside the forward are the same custom ops the program holds.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import sympy
import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from qcompile.capture import RETURN_DICT, Capture, finite_int
from qcompile.lora_graph import Adapters, linear_sites, unwrapped_structure, with_branches
from qcompile.modules import adopt_lora_layers, registration_generation

logger = logging.getLogger(__name__)

GRAPH, EAGER = "graph", "eager"
WARN_LIMIT = 16  # distinct fallback reasons warned about per model; later ones at debug
STALE = (
    "the model's modules changed after quantization (LoRA adapters added, a layer "
    "replaced), which the lowered graph does not contain"
)
LORA_OFF_GRAPH = "LoRA adapters wrap layers the lowered graph has no linear for"

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


class GraphRuntime:
    """Callable installed as `module.forward`; see the module docstring."""

    def __init__(
        self, module: nn.Module, captured: Capture, matcher: CallMatcher | None = None
    ) -> None:
        program = captured.program
        self.module = module
        self.program = program
        self.matcher = matcher or CallMatcher(captured)
        self.output_type = captured.output_type
        self.output_fields = captured.output_fields
        self.graph_enabled = True
        # Set by a pipeline's .to(dtype) (see api._to): floating inputs are cast to the
        # model's dtype, floating outputs to this one.
        self.io_dtype: torch.dtype | None = None
        self._structure = unwrapped_structure(module)[0]
        self._generation = registration_generation()
        self._stale = ""
        self._sites = linear_sites(program)  # linear FQN → its op nodes, for LoRA
        self._adapters: Adapters | None = None
        self.calls: Counter[str] = Counter()
        self.last_path: str | None = None
        self.last_reason = ""
        self._warned: set[str] = set()
        sig = program.graph_signature
        bad = [s.kind for s in sig.output_specs if s.kind is not OutputKind.USER_OUTPUT]
        if bad:
            raise NotImplementedError(f"programs that mutate state are not supported: {bad}")
        self._state = [
            self._resolver(spec)
            for spec in sig.input_specs
            if spec.kind is not InputKind.USER_INPUT
        ]
        self._device = _graph_device(program)
        self._graph_modules = {(self._device, ()): program.graph_module}
        self._constants: dict[torch.device, dict[str, torch.Tensor]] = {}
        make_weightless(program)  # from here on the live module owns every tensor

    # ----------------------------------------------------------------- calling
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.io_dtype is None:
            return self._call(args, kwargs)
        inner = self.module.dtype
        args, kwargs = _cast_floating((args, kwargs), inner)
        return _cast_floating(self._call(args, kwargs), self.io_dtype)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        if torch.compiler.is_compiling():  # Dynamo traces the forward; no Python state
            return type(self.module).forward(self.module, *args, **kwargs)
        routed = self._route(args, kwargs)
        if isinstance(routed, str):
            self._record(EAGER, routed)
            return type(self.module).forward(self.module, *args, **kwargs)
        flat, device, return_dict, branches = routed
        self._record(GRAPH, "")
        gm = self._graph_module(device, tuple(branches))
        extra = [tensor for pair in branches.values() for tensor in pair]
        outputs = gm(*self._state_tensors(device), *flat, *extra)
        result = pytree.tree_unflatten(list(outputs), self.program.call_spec.out_spec)
        if return_dict and self.output_type is not None:
            return self.output_type(**dict(zip(self.output_fields, result, strict=True)))
        return result

    def _route(self, args: tuple, kwargs: dict) -> str | tuple:
        """(flat inputs, device, return_dict, LoRA branches by FQN), or the reason the
        call runs eagerly."""
        if not self.graph_enabled:
            return "graph disabled"
        if self._generation != registration_generation():
            self._generation = registration_generation()
            self._check_structure()
        if self._stale:
            return self._stale
        routed = self.matcher.match(args, kwargs)
        if isinstance(routed, str):
            return routed
        if torch.is_grad_enabled() and self._needs_grad(routed[0]):
            return "autograd is on and something requires grad (the graph has no backward)"
        branches = {}
        if self._adapters is not None:
            branches = self._adapters.branches(self.matcher.lora_scale(args, kwargs))
            if isinstance(branches, str):
                return f"a LoRA adapter the graph cannot run ({branches})"
        return (*routed, branches)

    def _check_structure(self) -> None:
        """After a submodule registration: the graph runs on (LoRA layers around its
        linears ride as branches), or calls go eager until the modules are back."""
        structure, layers = unwrapped_structure(self.module)
        if layers:
            adopt_lora_layers(self.module)
        self._adapters = None
        if structure != self._structure:
            self._stale = STALE
        elif not layers.keys() <= self._sites.keys():
            self._stale = LORA_OFF_GRAPH
        else:
            self._stale = ""
            self._adapters = Adapters(layers) if layers else None

    def _needs_grad(self, flat: list) -> bool:
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):
            return True
        return any(p.requires_grad for p in self.module.parameters())

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own forward (quantized linears), whatever the call."""
        return type(self.module).forward(self.module, *args, **kwargs)

    def _record(self, path: str, reason: str) -> None:
        self.calls[path] += 1
        self.last_path, self.last_reason = path, reason
        if not reason:
            return
        # A call that leaves the graph is worth a warning the first time for each reason
        # (a dtype or argument the capture did not cover makes every such call eager and
        # slow); repeats, and a graph the user disabled, only at debug level.
        name = type(self.module).__name__
        if reason in self._warned or not self.graph_enabled or len(self._warned) >= WARN_LIMIT:
            logger.debug("%s: eager fallback (%s)", name, reason)
            return
        self._warned.add(reason)
        if reason in (STALE, LORA_OFF_GRAPH):
            hint = "it is correct, and back on the graph once the modules are restored"
        else:
            hint = "to keep such calls on the graph, quantize with example_inputs taken from one"
        logger.warning(
            "%s: this call runs the eager fallback, not the compiled graph, because %s. "
            "Calls like it stay eager (slower); %s.",
            name,
            reason,
            hint,
        )

    # ----------------------------------------------------------------- state
    def _resolver(self, spec):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            owner_name, _, attr = spec.target.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            return lambda device: getattr(owner, attr)
        if spec.kind is InputKind.CONSTANT_TENSOR:
            return lambda device: self._constant(spec.target, device)
        raise NotImplementedError(f"unsupported program input kind {spec.kind}")

    def _state_tensors(self, device: torch.device) -> list[torch.Tensor]:
        return [resolve(device) for resolve in self._state]

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        per_device = self._constants.setdefault(device, {})
        if name not in per_device:
            per_device[name] = self.program.constants[name].to(device)
        return per_device[name]

    def _graph_module(self, device: torch.device, lora: tuple[str, ...] = ()):
        """The graph for `device`, with LoRA branches after the linears `lora`."""
        key = (device, lora)
        if key not in self._graph_modules:
            if lora:
                gm = with_branches(self._graph_module(device), self._sites, list(lora))
            else:
                gm = _retarget(self.program.graph_module, self._device, device)
            self._graph_modules[key] = gm
        return self._graph_modules[key]


def _cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """`tree` with its floating-point tensors cast to `dtype` (diffusers' output
    classes are pytree nodes, so their fields are reached too)."""

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.to(dtype)
        return leaf

    return pytree.tree_map(cast, tree)


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


def make_weightless(program) -> None:
    """Swap the program's parameters and buffers for meta tensors (the live module owns
    them); parameters stay `nn.Parameter`s so the program still validates and saves."""
    for name, tensor in program.state_dict.items():
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=False)
        program.state_dict[name] = meta


def _graph_device(program) -> torch.device:
    """The device the graph's literals name (arange/zeros/...), else its state's device."""
    for node in program.graph.nodes:
        device = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(device, torch.device):
            return device
    for tensor in program.state_dict.values():
        return tensor.device
    return torch.device("cpu")


def _retarget(gm: torch.fx.GraphModule, old: torch.device, new: torch.device):
    """A copy of `gm` whose device literals (arange/zeros/_to_copy/asserts) say `new`."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        device = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(device, torch.device) and device.type == old.type:
            node.update_kwarg("device", new)
    gm.recompile()
    logger.info("graph retargeted from %s to %s", old, new)
    return gm


def runtime_of(module: nn.Module) -> GraphRuntime | None:
    """The GraphRuntime installed on a quantized module, or None. Found under
    accelerate's hooks too (device_map, CPU offload), which keep the forward they
    wrap as `_old_forward`."""
    for attr in ("forward", "_old_forward"):
        forward = module.__dict__.get(attr)
        if isinstance(forward, GraphRuntime):
            return forward
    return None
