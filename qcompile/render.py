"""Readable renderings of a program's graph: ops and shapes, not node names.

Used by the graph-diff tests as golden text. Symbolic dims are renamed s0, s1, ... in
order of first appearance, so renderings are stable across torch versions.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import fx
from torch.export import ExportedProgram

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int64: "i64",
    torch.bool: "b8",
    torch.float8_e4m3fn: "f8e4m3",
}


def op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        return f"{ns}.{name}"
    return getattr(target, "__name__", str(target))


def render_graph(program: ExportedProgram) -> str:
    """One line per call_function node: `op(arg, ...) -> result`."""
    symbols: dict[str, str] = {}

    def sym(text: str) -> str:
        return re.sub(r"\bs\d+\b", lambda m: symbols.setdefault(m[0], f"s{len(symbols)}"), text)

    def show(arg: object) -> str:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            return show(val) if isinstance(val, (torch.Tensor, list, tuple)) else sym(str(val))
        if isinstance(arg, (list, tuple)):  # lists and tuples alike (serialization swaps them)
            return "[" + ", ".join(show(a) for a in arg) + "]"
        if isinstance(arg, torch.Tensor):
            return show_tensor(arg)
        return repr(arg)

    def show_tensor(val: torch.Tensor) -> str:
        dims = ", ".join(sym(str(d)) for d in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{dims}]"

    lines = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        args = [show(a) for a in node.args]
        args += [f"{k}={show(v)}" for k, v in node.kwargs.items()]
        lines.append(f"{op_name(node.target)}({', '.join(args)}) -> {show(node)}")
    return "\n".join(lines)


def op_counts(program: ExportedProgram) -> Counter[str]:
    """How many call_function nodes of each op the graph has."""
    return Counter(op_name(n.target) for n in program.graph.nodes if n.op == "call_function")
