"""LoRA adapters on the graph path: a 16-bit low-rank branch beside each lowered linear.

When peft wraps linears of a quantized model (diffusers' `load_lora_weights`,
`add_adapter`) and nothing else changed, the runtime keeps running the lowered graph:
`with_branches` copies it and adds, after each wrapped linear's op, the branch
``y + ((x @ down.T) @ up.T)`` whose `down` [R, K] and `up` [N, R] are extra graph
inputs. `adapter_branch` builds them on every call from the peft layer's live state, so
`set_adapters` weights, `disable_lora`, a pipeline's LoRA `scale`, deleting or fusing an
adapter all take effect on the next call; several active adapters are concatenated
along R, each adapter's scaling folded into its `up`. The branch computes in the
adapters' dtype and adds in the output's, as peft's forward does. What the branch cannot
express (DoRA, a LoRA bias, other peft variants, dropout while training) sends the call
to the module's own forward, which is peft's, with the reason.
"""

from __future__ import annotations

import copy
import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export.graph_signature import InputKind

from qcompile.modules import is_lora_layer
from qcompile.schemes import QUANTIZE_DYNAMIC, QUANTIZE_STATIC

_X_IS_FIRST = (  # ops whose first argument is the 16-bit input; the weight comes second
    torch.ops.aten.linear.default,
    torch.ops.qcompile.linear_int8_wo.default,
    torch.ops.qcompile.linear_fp8_wo.default,
    torch.ops.qcompile.linear_int4_wo.default,
    torch.ops.qcompile.linear_w4a16.default,
    torch.ops.qcompile.linear_w4a4.default,
    torch.ops.qcompile.linear_w4a8.default,
)
_X_QUANTIZED = (  # (x_q, x_scale, weight, ...): x is what the quantize node read
    torch.ops.qcompile.linear_int8_w8a8.default,
    torch.ops.qcompile.linear_fp8_w8a8.default,
)

Branch = tuple[torch.Tensor, torch.Tensor]  # (down [R, K], up [N, R])


def linear_sites(program) -> dict[str, list[tuple[str, str]]]:
    """Linear FQN → [(name of its op node, name of its 16-bit input node)], for the
    float linears and qcompile's lowered ones, found through their weight's FQN."""
    targets = {
        spec.arg.name: spec.target
        for spec in program.graph_signature.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
    }
    sites: dict[str, list[tuple[str, str]]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _X_IS_FIRST + _X_QUANTIZED:
            continue
        first = node.target in _X_IS_FIRST
        weight = node.args[1] if first else node.args[2]
        target = targets.get(getattr(weight, "name", None), "")
        if not target.endswith(".weight"):
            continue
        x = node.args[0] if first else _quantize_input(node.args[0])
        if x is not None:
            sites.setdefault(target.removesuffix(".weight"), []).append((node.name, x.name))
    return sites


def _quantize_input(x_q: fx.Node) -> fx.Node | None:
    if x_q.target is operator.getitem:  # (x_q, scale) = quantize_act_dynamic(x)
        x_q = x_q.args[0]
    if x_q.target in (QUANTIZE_STATIC, QUANTIZE_DYNAMIC):
        return x_q.args[0]
    return None


def unwrapped_structure(module: nn.Module) -> tuple[tuple, dict[str, nn.Module]]:
    """The model's structure with each peft LoRA layer read as the layer it wraps, and
    those LoRA layers by FQN: equal structure means LoRA layers are the only change."""
    entries, layers, inside = [], {}, None
    for name, child in module.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # the LoRA layer's own submodules (base_layer, lora_A, ...)
        inside = None
        if is_lora_layer(child):
            layers[name] = child
            inside = f"{name}."
            child = child.get_base_layer()
        entries.append((name, id(child)))
    return tuple(entries), layers


def adapter_branch(layer: nn.Module, scale: float) -> Branch | str | None:
    """The branch peft's forward would add for `layer` now (its scaling times a
    pipeline's LoRA `scale`), None when it adds nothing, or why the graph cannot."""
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()  # peft's forward does this too
        return None
    if layer.merged:
        return None
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    if not names or scale == 0:
        return None
    downs, ups = [], []
    for name in names:
        if layer.use_dora.get(name) or getattr(layer, "lora_bias", {}).get(name):
            return f"adapter {name!r} uses DoRA or a LoRA bias"
        if name in getattr(layer, "lora_variant", {}):
            return f"adapter {name!r} is a peft LoRA variant"
        dropout = layer.lora_dropout[name]
        if dropout.training and getattr(dropout, "p", 0):
            return f"adapter {name!r} applies dropout (the model is in training mode)"
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        downs.append(a)
        ups.append(b * (layer.scaling[name] * scale))
    dtype = downs[0].dtype
    if len(names) == 1:
        return downs[0], ups[0].to(dtype)
    return torch.cat([d.to(dtype) for d in downs]), torch.cat([u.to(dtype) for u in ups], dim=1)


def add_branch(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor):
    """What `with_branches` inserts after a linear: y + up(down(x)), as peft computes
    it (x cast to the adapters' dtype, the sum in y's)."""
    return y + F.linear(F.linear(x.to(down.dtype), down), up).to(y.dtype)


def with_branches(
    gm: fx.GraphModule, sites: dict[str, list[tuple[str, str]]], fqns: list[str]
) -> fx.GraphModule:
    """A copy of `gm` whose linears `fqns` add a branch; it takes (down, up) per FQN, in
    order, as inputs after the ones it had."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {node.name: node for node in graph.nodes}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for fqn in fqns:
        with graph.inserting_after(last):
            down = graph.placeholder(f"lora_down_{len(nodes)}")
        with graph.inserting_after(down):
            up = graph.placeholder(f"lora_up_{len(nodes)}")
        nodes[down.name], nodes[up.name], last = down, up, up
        for op_name, x_name in sites[fqn]:
            op = nodes[op_name]
            with graph.inserting_after(op):
                added = graph.call_function(add_branch, (op, nodes[x_name], down, up))
            op.replace_all_uses_with(
                added, delete_user_cb=functools.partial(operator.is_not, added)
            )
    graph.lint()
    gm.recompile()
    return gm


class Adapters:
    """The peft LoRA layers of a quantized model, read into branch inputs per call."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self._cache: dict[str, tuple[tuple, Branch]] = {}

    def branches(self, scale: float) -> dict[str, Branch] | str:
        """FQN → (down, up) of the layers that add a branch now, or why not."""
        result = {}
        for fqn, layer in self.layers.items():
            key = _state_key(layer, scale)
            cached = self._cache.get(fqn)
            if key is not None and cached is not None and cached[0] == key:
                result[fqn] = cached[1]
                continue
            branch = adapter_branch(layer, scale)
            if isinstance(branch, str):
                return f"{fqn}: {branch}"
            if branch is not None:
                self._cache[fqn] = (key, branch)
                result[fqn] = branch
        return result


def _state_key(layer: nn.Module, scale: float) -> tuple | None:
    """Everything `adapter_branch` reads, cheaply; None while the branch can change
    without it (disabled or merged layers are re-read every call)."""
    if layer.disable_adapters or layer.merged:
        return None
    parts: list = [scale]
    for name in layer.active_adapters:
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            parts += [name, id(a), a._version, id(b), b._version, layer.scaling[name]]
            parts += [layer.lora_dropout[name].training]
    return tuple(parts)
