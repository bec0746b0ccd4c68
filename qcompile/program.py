"""In-place ExportedProgram surgery: the one helper every lowering goes through.

Adding an FQN-named buffer, dropping an input, swapping a node: each keeps the graph,
`graph_signature` (input and output specs), `state_dict` and the nodes' fake-tensor
`meta["val"]` consistent. `finalize` ends with `ExportedProgram.validate()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx.passes.shape_prop import _extract_tensor_metadata

# Node metadata kept when a node is swapped for another computing the same value.
_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "custom")


def placeholders(program: ExportedProgram) -> dict[str, fx.Node]:
    return {n.name: n for n in program.graph.nodes if n.op == "placeholder"}


def input_spec_of(program: ExportedProgram, node: fx.Node) -> InputSpec | None:
    for spec in program.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
            return spec
    return None


def state_tensor(program: ExportedProgram, node: fx.Node) -> torch.Tensor | None:
    """The parameter/buffer/constant tensor a placeholder stands for, else None."""
    spec = input_spec_of(program, node)
    if spec is None or spec.target is None:
        return None
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
        return program.state_dict[spec.target]
    if spec.kind is InputKind.CONSTANT_TENSOR:
        return program.constants[spec.target]
    return None


def buffer_node(program: ExportedProgram, target: str) -> fx.Node | None:
    """The placeholder of parameter/buffer `target` (an FQN), or None."""
    for spec in program.graph_signature.input_specs:
        if spec.target == target and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            return placeholders(program)[spec.arg.name]
    return None


def swap_input(program: ExportedProgram, node: fx.Node, tensor: torch.Tensor) -> fx.Node:
    """Replace parameter/buffer placeholder `node` by a buffer of the same FQN holding
    `tensor` (same users); return the new placeholder. The old tensor is not touched."""
    spec = input_spec_of(program, node)
    program.graph_signature.input_specs.remove(spec)
    del program.state_dict[spec.target]
    new = add_buffer(program, spec.target, tensor)
    node.replace_all_uses_with(new)
    program.graph.erase_node(node)
    return new


def redirect_uses(program: ExportedProgram, old: fx.Node, new: fx.Node) -> None:
    """Make every user of `old` but `new` itself (and the graph outputs) read `new`."""
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    specs = program.graph_signature.output_specs
    for i, spec in enumerate(specs):
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == old.name:
            specs[i] = dataclasses.replace(spec, arg=TensorArgument(new.name))


def add_buffer(program: ExportedProgram, target: str, tensor: torch.Tensor) -> fx.Node:
    """Add a persistent buffer `target` (an FQN) as a placeholder before the user inputs."""
    if target in program.state_dict:
        raise ValueError(f"program already holds a tensor named {target!r}")
    graph = program.graph
    specs = program.graph_signature.input_specs
    index = next((i for i, s in enumerate(specs) if s.kind is InputKind.USER_INPUT), len(specs))
    anchor = next(n for n in graph.nodes if n.op != "placeholder" or index == 0)
    if index < len(specs):
        anchor = placeholders(program)[specs[index].arg.name]
    with graph.inserting_before(anchor):
        node = graph.placeholder("b_" + target.replace(".", "_"))
    fake_mode = detect_fake_mode(
        [n.meta["val"] for n in graph.nodes if n.op == "placeholder" and "val" in n.meta]
    )
    fake = fake_mode.from_tensor(tensor, static_shapes=True)
    node.meta["val"] = fake
    node.meta["tensor_meta"] = _extract_tensor_metadata(fake)
    specs.insert(
        index, InputSpec(InputKind.BUFFER, TensorArgument(node.name), target, persistent=True)
    )
    program.state_dict[target] = tensor
    return node


def remove_input(program: ExportedProgram, node: fx.Node) -> None:
    """Drop an unused parameter/buffer placeholder, its input spec and its state."""
    if node.users:
        raise ValueError(f"placeholder {node.name} still has users: {list(node.users)}")
    spec = input_spec_of(program, node)
    program.graph_signature.input_specs.remove(spec)
    still_used = any(s.target == spec.target for s in program.graph_signature.input_specs)
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and not still_used:
        del program.state_dict[spec.target]
    program.graph.erase_node(node)


def replace_node(
    program: ExportedProgram, old: fx.Node, target: Any, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Swap `old` for `target(*args, **kwargs)` computing the same value (same meta["val"])."""
    with program.graph.inserting_before(old):
        new = program.graph.call_function(target, args, kwargs or {})
    new.meta.update({k: old.meta[k] for k in (*_KEPT_META, "val", "tensor_meta") if k in old.meta})
    redirect_uses(program, old, new)
    program.graph.erase_node(old)
    return new


def insert_call(program: ExportedProgram, target: Any, args: tuple, before: fx.Node) -> fx.Node:
    """Insert `target(*args)` before `before`; meta["val"] computed under the fake mode."""
    graph = program.graph
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    fake_mode = detect_fake_mode(
        [n.meta["val"] for n in graph.nodes if n.op == "placeholder" and "val" in n.meta]
    )
    fake_args = fx.node.map_arg(args, lambda n: n.meta["val"])
    with fake_mode:
        node.meta["val"] = target(*fake_args)
    for key in _KEPT_META:
        if key in before.meta:
            node.meta[key] = before.meta[key]
    return node


def finalize(program: ExportedProgram) -> None:
    program.graph.lint()
    program.graph_module.recompile()
    program.validate()
