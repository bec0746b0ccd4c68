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
runs the forward too (the program holds no backward). `compile` runs the graph itself
through torch.compile with the qcompile backend (on CUDA by default), compiled on
its first call. Linears reading one activation run as one GEMM over storage the
runtime concatenates once and the members view (`horizontal_fusion`; row_groups.py).
Under torch.compile the module's forward is what Dynamo traces: the matcher is plain
Python over the call, and the qcompile ops inside the forward are the same custom ops
the program holds.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from qcompile.capture import Capture
from qcompile.lora_graph import Adapters, linear_sites, unwrapped_structure, with_branches
from qcompile.matcher import CallMatcher
from qcompile.modules import adopt_lora_layers, registration_generation
from qcompile.passes.fuse_horizontal import find_groups, fuse_groups
from qcompile.row_groups import RowStorage, slots_are_buffers

logger = logging.getLogger(__name__)

GRAPH, EAGER = "graph", "eager"
WARN_LIMIT = 16  # distinct fallback reasons warned about per model; later ones at debug
STALE = (
    "the model's modules changed after quantization (LoRA adapters added, a layer "
    "replaced), which the lowered graph does not contain"
)
LORA_OFF_GRAPH = "LoRA adapters wrap layers the lowered graph has no linear for"
HOOKED = (
    "submodule {name!r} has forward hooks (diffusers group offloading, layerwise casting "
    "or a cache; accelerate; torch hooks), which the lowered graph would bypass"
)


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
        # Run the graph through torch.compile(backend="qcompile"), compiled lazily on
        # the first call per graph: True, False, or None = when the inputs are on CUDA.
        # QCompileConfig(compile=...) sets it; a failed compile warns and turns it off.
        self.compile: bool | None = None
        self._compiled: dict[int, Any] = {}
        self._structure = unwrapped_structure(module)[0]
        self._submodules = _submodules(module)  # refreshed when a submodule is registered
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
        # Linears reading one activation run as one GEMM (passes/fuse_horizontal.py)
        # over storage the runtime concatenates once (row_groups.py); False runs each
        # linear alone.
        self.horizontal_fusion = True
        self._groups, self._row_storage = self._row_groups(program)
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
        fused = self._fused_tensors(device)
        gm = self._graph_module(device, tuple(branches), fused is not None)
        extra = [tensor for pair in branches.values() for tensor in pair]
        inputs = (*self._state_tensors(device), *flat, *extra, *(fused or ()))
        outputs = self._run(gm, device, inputs)
        result = pytree.tree_unflatten(list(outputs), self.program.call_spec.out_spec)
        if return_dict and self.output_type is not None:
            return self.output_type(**dict(zip(self.output_fields, result, strict=True)))
        return result

    def _run(self, gm: torch.fx.GraphModule, device: torch.device, inputs: tuple) -> Any:
        """The graph on `inputs`: compiled when `compile` asks for it (see __init__)."""
        wanted = self.compile if self.compile is not None else device.type == "cuda"
        if not wanted:
            return gm(*inputs)
        compiled = self._compiled.get(id(gm))
        first = compiled is None
        if first:
            compiled = torch.compile(gm, backend="qcompile", fullgraph=True)
            self._compiled[id(gm)] = compiled
            logger.info(
                "compiling %s's lowered graph with torch.compile (its first call; a large "
                "model takes minutes) ...",
                type(self.module).__name__,
            )
            start = time.perf_counter()
        try:
            out = compiled(*inputs)
            if first:
                logger.info("compiled in %.1f s", time.perf_counter() - start)
            return out
        except Exception as exc:
            logger.warning(
                "%s: torch.compile of the lowered graph failed (%s: %s); it runs "
                "uncompiled from now on. QCompileConfig(compile=False) skips compiling.",
                type(self.module).__name__,
                type(exc).__name__,
                exc,
            )
            self.compile = False
            return gm(*inputs)

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
        hooked = hooked_submodule(self.module, self._submodules)
        if hooked is not None:
            return HOOKED.format(name=hooked)
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
        self._submodules = _submodules(self.module)
        adopt_lora_layers(layers.values())
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
        elif reason.startswith("submodule "):
            hint = "it is correct, and back on the graph once the hooks are removed"
        elif " is torch." in reason and "captured as torch." in reason:
            hint = (
                "load the checkpoint with the torch_dtype you call it in (the graph is "
                "captured again for it), or quantize a model in that dtype"
            )
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

    def _graph_module(self, device: torch.device, lora: tuple[str, ...] = (), fused=False):
        """The graph for `device`, with LoRA branches after the linears `lora`, and
        with its row groups fused (taking their operands as its last inputs)."""
        key = (device, lora) if not fused else (device, lora, "fused")
        if key not in self._graph_modules:
            if fused:
                gm = fuse_groups(self._graph_module(device, lora), self._groups)
            elif lora:
                gm = with_branches(self._graph_module(device), self._sites, list(lora))
            else:
                gm = _retarget(self.program.graph_module, self._device, device)
            self._graph_modules[key] = gm
        return self._graph_modules[key]

    def _row_groups(self, program) -> tuple[list, list[RowStorage]]:
        """The program's fusable linear groups and the storage holding each one's
        concatenated operands (groups whose tensors are not plain buffers are left out)."""
        targets = {
            spec.arg.name: spec.target
            for spec in program.graph_signature.input_specs
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
        }
        groups, storages = [], []
        for group in find_groups(program.graph):
            if not all(name in targets for names in group.operands for name in names):
                continue
            operands = [[self._slot(targets[name]) for name in names] for names in group.operands]
            if slots_are_buffers(operands):
                groups.append(group)
                storages.append(RowStorage(operands))
        return groups, storages

    def _slot(self, target: str) -> tuple[nn.Module, str]:
        owner_name, _, attr = target.rpartition(".")
        return self.module.get_submodule(owner_name), attr

    def _fused_tensors(self, device: torch.device) -> list[torch.Tensor] | None:
        """Every group's operands on `device`, or None to run the graph unfused."""
        if not self.horizontal_fusion or not self._row_storage:
            return None
        fused = []
        for storage in self._row_storage:
            tensors = storage.tensors(device)
            if tensors is None:
                return None
            fused += tensors
        return fused


def _cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """`tree` with its floating-point tensors cast to `dtype` (diffusers' output
    classes are pytree nodes, so their fields are reached too)."""

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.to(dtype)
        return leaf

    return pytree.tree_map(cast, tree)


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
    retarget_devices(gm, old, new)
    logger.info("graph retargeted from %s to %s", old, new)
    return gm


def retarget_devices(gm: torch.fx.GraphModule, old: torch.device, new: torch.device) -> None:
    """Point `gm`'s device literals on `old`'s device type at `new`, in place."""
    for node in gm.graph.nodes:
        device = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(device, torch.device) and device.type == old.type:
            node.update_kwarg("device", new)
    gm.recompile()


def _submodules(module: nn.Module) -> list[nn.Module]:
    return [sub for sub in module.modules() if sub is not module]


def hooked_submodule(module: nn.Module, submodules: list[nn.Module] | None = None) -> str | None:
    """The name of the first submodule whose forward is wrapped (diffusers' hook
    registry and accelerate both replace the instance's `forward`) or carries torch
    forward hooks, or None. The lowered graph reads weights without calling any
    submodule, so such hooks (onloading offloaded weights, upcasting stored ones,
    skipping cached blocks) would not run. Checked on every call over the list of
    `submodules` the runtime keeps (0.2-0.4 ms for FLUX.1-dev's 1,278 on this
    project's CPU); the names are only looked up for a hooked one."""
    for sub in _submodules(module) if submodules is None else submodules:
        wrapped = "forward" in sub.__dict__ and _wrapped(sub)
        if wrapped or sub._forward_pre_hooks or sub._forward_hooks:
            return next(name for name, m in module.named_modules() if m is sub)
    return None


def _wrapped(module: nn.Module) -> bool:
    """Whether the instance's `forward` is something else than its class's own (a hook
    taken off by assigning the saved original back leaves that bound method)."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(module).forward


def runtime_of(module: nn.Module) -> GraphRuntime | None:
    """The GraphRuntime installed on a quantized module, or None. Found under
    accelerate's hooks too (device_map, CPU offload), which keep the forward they
    wrap as `_old_forward`, and under diffusers' hooks (group offloading, caches),
    whose wrapper names what it wraps as `__wrapped__`."""
    for attr in ("forward", "_old_forward"):
        forward = module.__dict__.get(attr)
        for _ in range(64):  # a chain of wrappers, one per hook
            if isinstance(forward, GraphRuntime):
                return forward
            forward = getattr(forward, "__wrapped__", None)
            if forward is None:
                break
    return None
