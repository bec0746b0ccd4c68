"""The lowered program on disk: a weightless `.pt2`, read back without unpickling.

`torch.export.load` may unpickle archive members (sample inputs always; weights and
constants flagged `use_pickle`, with a `weights_only=False` fallback), so a `.pt2` from
an untrusted folder could run code. `load_program` opens the archive itself and reads
only JSON members — the serialized program and the payload configs — plus raw bytes of
tensor constants; any member flagged as pickled is refused. Parameters and buffers come
back as meta tensors: the checkpoint's safetensors own the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from qcompile.errors import CheckpointError

# torch.export.save registers a process-wide pickler reducer for FakeTensor while it
# runs, and two saves at once in one process fail ("Refusing to stomp on existing
# FakeTensor reducer"): saves from several threads take turns.
_SAVE_LOCK = threading.Lock()


# Node metadata written without machine-specific text: a stack trace names the files
# (site-packages, the user's home) the model's code was traced from, so the same model
# would save different bytes on two machines. Kept on the live program (error messages).
_LOCAL_METADATA = ("stack_trace",)


def save_program(program: ExportedProgram, path: Path) -> None:
    """Write a weightless program (its state_dict on meta) as a standard `.pt2`, without
    the stack traces that would tie its bytes to this machine's paths."""
    with _SAVE_LOCK:
        held = {}
        for node in program.graph.nodes:
            kept = {key: node.meta.pop(key) for key in _LOCAL_METADATA if key in node.meta}
            if kept:
                held[node] = kept
        try:
            torch.export.save(program, str(path))
        finally:
            for node, kept in held.items():
                node.meta.update(kept)


RECAPTURE_HINT = (
    "delete it and loading captures the program again from the model (or re-save the checkpoint)"
)


def load_program(path: Path) -> ExportedProgram:
    """Read a `.pt2` written by `save_program`; nothing in it is unpickled. Every
    failure is a CheckpointError that says a deleted `.pt2` is captured again."""
    try:
        return _read_program(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {RECAPTURE_HINT}") from exc.__cause__


def _read_program(path: Path) -> ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        ExportedProgramDeserializer,
        deserialize_scalar_type,
    )

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable .pt2 archive ({exc})") from exc
    with archive:
        names = archive.namelist()
        models = [n for n in names if "/models/" in f"/{n}" and n.endswith(".json")]
        if len(models) != 1:
            raise CheckpointError(f"{path}: expected one program in the archive, found {models}")
        root, _, file = models[0].rpartition("models/")
        model = file.removesuffix(".json")

        def config(kind: str) -> schema.PayloadConfig:
            member = f"{root}data/{kind}/{model}_{kind}_config.json"
            try:
                return schema_from_json(schema.PayloadConfig, archive.read(member))
            except KeyError:
                raise CheckpointError(f"{path}: archive lacks {member}") from None

        def tensor(meta: schema.TensorMeta, raw: bytes | None) -> torch.Tensor:
            dtype = deserialize_scalar_type(meta.dtype)
            sizes = [s.as_int for s in meta.sizes]
            if raw is None:
                return torch.empty(sizes, dtype=dtype, device="meta")
            strides = [s.as_int for s in meta.strides]
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
            return flat.as_strided(sizes, strides, meta.storage_offset.as_int).clone()

        try:
            state_dict: dict[str, torch.Tensor] = {}
            for fqn, payload in config("weights").config.items():
                _refuse_pickle(path, fqn, payload)
                value = tensor(payload.tensor_meta, None)
                state_dict[fqn] = nn.Parameter(value, False) if payload.is_param else value
            constants: dict[str, torch.Tensor] = {}
            for fqn, payload in config("constants").config.items():
                _refuse_pickle(path, fqn, payload)
                raw = archive.read(f"{root}data/constants/{payload.path_name}")
                constants[fqn] = tensor(payload.tensor_meta, raw)
            serialized = schema_from_json(schema.ExportedProgram, archive.read(models[0]))
            program = ExportedProgramDeserializer().deserialize(
                serialized, state_dict, constants, ((), {})
            )
            program.example_inputs = _placeholder_inputs(program)
            return program
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: the lowered program cannot be read ({exc})") from exc


def schema_from_json(cls: type, raw: bytes) -> Any:
    """torch.export's serialized schema dataclasses from their JSON, as torch's own
    ``serialize._bytes_to_dataclass`` reads them (the same rules: keys the schema lacks
    are ignored, unions are one-key dicts, floats are floats), with each class's type
    hints resolved once instead of at every object: loading a program was spent mostly
    there (tests/qcompile/test_checkpoint_errors.py compares the two readers)."""
    from torch._export.serde import schema

    return _from_dict(cls, json.loads(raw.decode("utf-8")), schema)


@functools.cache
def _hints(cls: type, schema: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(schema))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _resolve(cls: Any, schema: Any) -> Any:
    if isinstance(cls, typing.ForwardRef):
        cls = cls.__forward_arg__
    if isinstance(cls, str):
        resolved = getattr(schema, cls, None)
        if resolved is None:
            raise CheckpointError(f"program schema names an unknown class {cls!r}")
        return resolved
    return cls


def _from_dict(cls: Any, data: Any, schema: Any) -> Any:
    from torch._export.serde.union import _Union

    cls = _resolve(cls, schema)
    origin = typing.get_origin(cls)
    if origin is typing.Annotated:
        return _from_dict(cls.__origin__, data, schema)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        if data is None:
            return None
        args = typing.get_args(cls)
        if len(args) != 2:
            raise CheckpointError(f"program schema: expected an optional type, got {cls}")
        return _from_dict(args[0], data, schema)
    if isinstance(cls, type) and issubclass(cls, _Union):
        if not isinstance(data, dict) or len(data) != 1:
            raise CheckpointError(f"program schema: {cls.__name__} wants a one-key dict")
        ((kind, value),) = data.items()
        return cls.create(**{kind: _from_dict(_hints(cls, schema)[kind], value, schema)})
    if dataclasses.is_dataclass(cls):
        hints = _hints(cls, schema)
        fields = {
            name: _from_dict(hints[name], data[name], schema)
            for name in _field_names(cls)
            if name in data
        }
        return cls(**fields)
    if isinstance(data, list):
        if not data:
            return data
        (item,) = typing.get_args(cls)[:1]
        return [_from_dict(item, d, schema) for d in data]
    if isinstance(data, dict):
        value_type = typing.get_args(cls)[1]
        return {k: _from_dict(value_type, v, schema) for k, v in data.items()}
    if cls is float:
        return float(data)
    return data


def _placeholder_inputs(program: ExportedProgram) -> tuple:
    """Example inputs with the capture's structure (the archive's own are pickled).

    torch.export builds its guard function from the example inputs' pytree paths only;
    0-dim tensors stand in for tensors, constants keep their value.
    """
    from torch.export.graph_signature import InputKind
    from torch.utils import _pytree as pytree

    nodes = [n for n in program.graph.nodes if n.op == "placeholder"]
    leaves = [
        torch.empty(()) if isinstance(node.meta.get("val"), torch.Tensor) else node.meta.get("val")
        for node, spec in zip(nodes, program.graph_signature.input_specs, strict=True)
        if spec.kind is InputKind.USER_INPUT
    ]
    return pytree.tree_unflatten(leaves, program.call_spec.in_spec)


def _refuse_pickle(path: Path, fqn: str, payload) -> None:
    if payload.use_pickle or payload.tensor_meta is None:
        raise CheckpointError(
            f"{path}: archive member for {fqn!r} is pickled, and qcompile never unpickles on load"
        )


def check_program_fits(program: ExportedProgram, model: nn.Module, path: Path) -> None:
    """Refuse a program captured from another model: every parameter and buffer it reads
    must exist in `model` with its shape (and, for packed integer/FP8 tensors, dtype)."""
    from torch.export.graph_signature import InputKind

    for spec in program.graph_signature.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER):
            continue
        want = program.state_dict.get(spec.target)
        if want is None:  # a non-persistent buffer: the program keeps it as a constant
            want = program.constants.get(spec.target)
        if want is None:
            continue
        owner, _, attr = spec.target.rpartition(".")
        try:
            have = getattr(model.get_submodule(owner), attr)
        except AttributeError:
            have = None
        packed = not want.dtype.is_floating_point or want.element_size() == 1
        if (
            not isinstance(have, torch.Tensor)
            or have.shape != want.shape
            or (packed and have.dtype != want.dtype)
        ):
            found = "nothing" if have is None else f"{tuple(have.shape)} {have.dtype}"
            raise CheckpointError(
                f"{path} does not belong to this {type(model).__name__}: it reads "
                f"{spec.target!r} as {tuple(want.shape)} {want.dtype}, the model has "
                f"{found}. The folder mixes files from two checkpoints; re-save it, or "
                "delete the .pt2 to re-capture the program from the model"
            )
