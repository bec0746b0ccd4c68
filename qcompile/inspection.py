"""`qcompile inspect`: what a saved checkpoint holds, read without loading its weights.

Everything comes from the config (recipe, per-layer schemes, dtype), the lowered
program (its ops, read from the .pt2 with its weights left out) and the safetensors
headers (tensor shapes and dtypes): a checkpoint of any size inspects in seconds.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.export.graph_signature import InputKind

from qcompile.checkpoint import read_config, weight_files, weights_name
from qcompile.errors import CheckpointError
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.passes.fuse_horizontal import find_groups
from qcompile.pt2 import load_program
from qcompile.recipes import LayerScheme
from qcompile.schemes import QUANTIZE_DYNAMIC, QUANTIZE_STATIC

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2}


def find_checkpoint(path: str | Path) -> Path:
    """The qcompile model folder at `path`, or inside the pipeline folder at `path`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if (path / "model_index.json").is_file():
        for child in sorted(p for p in path.iterdir() if (p / "config.json").is_file()):
            try:
                read_config(child)
            except CheckpointError:
                continue
            return child
        raise CheckpointError(
            f"{path} is a pipeline folder with no qcompile-quantized component; quantize "
            "one with `qcompile quantize` first"
        )
    read_config(path)  # a clear error when it is not a qcompile model folder
    return path


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The report `qcompile inspect` prints, as plain data."""
    folder = find_checkpoint(path)
    config, qconfig = read_config(folder)
    tensors = _tensor_headers(folder)
    float_bytes = torch.empty((), dtype=getattr(torch, qconfig.dtype or "bfloat16")).element_size()
    program_path = folder / (qconfig.program or PROGRAM_NAME)
    program = load_program(program_path) if program_path.is_file() else None
    if program is not None:
        shapes = _linears_of_program(program)
    else:  # loading captures it again; the model's linears come from its config
        shapes = {fqn: (shape, None) for fqn, shape in _linears_of_config(config).items()}
    layers = []
    for fqn, ((out_features, in_features), op) in shapes.items():
        scheme = qconfig.layers.get(fqn)
        stored = sum(nbytes for name, nbytes in tensors.items() if name.startswith(f"{fqn}."))
        layers.append(
            {
                "layer": fqn,
                "op": op,
                "scheme": _describe(scheme) if scheme is not None else "unquantized",
                "shape": [out_features, in_features],
                "bytes": stored,
                "bytes_unquantized": (out_features * in_features + out_features) * float_bytes,
            }
        )
    quantized = [layer for layer in layers if layer["scheme"] != "unquantized"]
    elements = sum(a * b for a, b in (layer["shape"] for layer in layers))
    quantized_elements = sum(a * b for a, b in (layer["shape"] for layer in quantized))
    saved = sum(layer["bytes_unquantized"] - layer["bytes"] for layer in quantized)
    total = sum(tensors.values())
    return {
        "path": str(folder),
        "model": config.get("_class_name"),
        "recipe": qconfig.recipe.name,
        "recipe_json": json.loads(qconfig.recipe.to_json()),
        "dtype": qconfig.dtype,
        "program": str(program_path) if program is not None else None,
        "layers": layers,
        "linears": len(layers),
        "linears_quantized": len(quantized),
        "fraction_quantized": quantized_elements / elements if elements else 0.0,
        "bytes": total,
        "bytes_unquantized": total + saved,
        "graph": _graph_summary(program) if program is not None else None,
    }


def _linears_of_program(program) -> dict[str, tuple[tuple[int, int], str]]:
    """Each linear the program runs: FQN → ((N, K), its op's name)."""
    targets = {
        spec.arg.name: spec.target
        for spec in program.graph_signature.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
    }
    found = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target._opname
        if not (op == "linear" or op.startswith("linear_")):
            continue
        weight = _weight_arg(node)
        fqn = targets.get(getattr(weight, "name", None), "").removesuffix(".weight")
        if fqn:
            shape = (node.meta["val"].shape[-1], _input(node).meta["val"].shape[-1])
            found[fqn] = (shape, op)
    return found


def _linears_of_config(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each nn.Linear of the model `config` describes: FQN → (N, K), from the model
    built on the meta device (no weights; the .pt2 is missing)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise CheckpointError(
            f"config.json names model class {config.get('_class_name')!r}, which diffusers "
            "lacks, and the folder has no qcompile program to read the layers from"
        )
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if k != "quantization_config"})
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _graph_summary(program) -> dict[str, Any]:
    ops = Counter(
        node.target._opname
        for node in program.graph.nodes
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "qcompile"
    )
    groups = find_groups(program.graph)
    return {
        "qcompile_ops": dict(sorted(ops.items())),
        **_quantize_sharing(program.graph),
        "horizontal_groups": len(groups),
        "horizontally_fused_linears": sum(len(g.nodes) for g in groups),
    }


def format_inspection(report: dict[str, Any]) -> str:
    ratio = report["bytes_unquantized"] / report["bytes"] if report["bytes"] else 0.0
    graph = report["graph"]
    head = [
        ("checkpoint", report["path"]),
        ("model", f"{report['model']} ({report['dtype']})"),
        ("recipe", report["recipe"]),
        ("linears quantized", f"{report['linears_quantized']} of {report['linears']}"),
        ("weights quantized", f"{100 * report['fraction_quantized']:.1f}% of linear weights"),
        ("weight bytes, unquantized", f"{report['bytes_unquantized']:,}"),
        ("weight bytes, checkpoint", f"{report['bytes']:,} ({ratio:.2f}× smaller)"),
    ]
    if graph is None:
        head.append(("program", "missing: captured again from the model when it loads"))
    else:
        head += [
            ("qcompile ops", ", ".join(f"{k} {v}" for k, v in graph["qcompile_ops"].items())),
            (
                "activation quantizations",
                f"{graph['activation_quantizations']} for {graph['quantized_gemms']} GEMMs "
                f"({graph['shared_quantizations']} shared)",
            ),
            (
                "horizontal fusion",
                f"{graph['horizontally_fused_linears']} linears in "
                f"{graph['horizontal_groups']} GEMMs at run time",
            ),
        ]
    width = max(len(k) for k, _ in head)
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    name_width = max((len(layer["layer"]) for layer in report["layers"]), default=5)
    lines += ["", f"{'layer':<{name_width}}  {'op':<18} {'N x K':>13} {'bytes':>12}  scheme"]
    for layer in report["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(
            f"{layer['layer']:<{name_width}}  {layer['op'] or '-':<18} {shape:>13} "
            f"{layer['bytes']:>12,}  {layer['scheme']}"
        )
    return "\n".join(lines)


def _tensor_headers(folder: Path) -> dict[str, int]:
    """Every stored tensor's byte size, from the safetensors headers alone."""
    files = sorted(set(weight_files(folder).values())) or [folder / weights_name()]
    sizes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    part = f.get_slice(name)
                    count = 1
                    for dim in part.get_shape():
                        count *= dim
                    sizes[name] = count * _DTYPE_BYTES.get(part.get_dtype(), 1)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    return sizes


def _weight_arg(node):
    if node.target in (
        torch.ops.qcompile.linear_int8_w8a8.default,
        torch.ops.qcompile.linear_fp8_w8a8.default,
    ):
        return node.args[2]
    return node.args[1]


def _input(node):
    return node.args[0]


def _describe(scheme: LayerScheme) -> str:
    scheme = scheme.to_dict()
    weight, act = scheme["weight"], scheme.get("activation") or {}
    text = f"w:{weight['format']} {weight['granularity']}"
    if weight.get("group_size"):
        text += f"/{weight['group_size']}"
    if act.get("mode") not in (None, "none"):
        text += f", a:{act['format']} {act['mode']}"
    if scheme.get("smooth"):
        text += ", smooth"
    if scheme.get("rank"):
        text += f", rank {scheme['rank']}"
    return text


def _quantize_sharing(graph) -> dict[str, int]:
    """How many activation quantizations the program runs, for how many GEMMs."""
    quantizes, gemms, shared = 0, 0, 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (QUANTIZE_DYNAMIC, QUANTIZE_STATIC):
            continue
        quantizes += 1
        users = list(node.users)
        if node.target is QUANTIZE_DYNAMIC:  # (x_q, scale) = ...: the GEMMs read x_q
            users = [u for g in users if g.target is operator.getitem for u in g.users]
            users = list(dict.fromkeys(users))
        gemms += len(users)
        shared += len(users) > 1
    return {
        "activation_quantizations": quantizes,
        "quantized_gemms": gemms,
        "shared_quantizations": shared,
    }
