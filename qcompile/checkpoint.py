"""qcompile checkpoints: a diffusers model folder plus the weightless lowered program.

    config.json                          model config + quantization_config (QCompileConfig)
    diffusion_pytorch_model.safetensors  tensors by FQN (packed weights, scales, the rest);
                                         header metadata carries a CRC32 per tensor
                                         (or diffusers' shards + index json when the
                                         save had a max_shard_size below its size)
    qcompile_program.pt2                 the lowered program, weightless
    README.md                            how to load it

Saves are atomic (`qcompile.atomic`); loads never unpickle (`qcompile.pt2`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.export import ExportedProgram

from qcompile.atomic import atomic_directory
from qcompile.errors import CheckpointError, QCompileError
from qcompile.integrations.diffusers_config import PROGRAM_NAME, QCompileConfig
from qcompile.pt2 import load_program, save_program
from qcompile.row_groups import shares_storage

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
CRC_KEY = "qcompile_crc32"
README_NAME = "README.md"
README_HEAD = "# qcompile checkpoint"  # how a README.md qcompile wrote itself begins
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "10GB"  # diffusers' save_pretrained default

_README = (
    README_HEAD
    + """

A diffusers model quantized by qcompile (recipe `{recipe}`). Load it with:

```python
import qcompile  # registers the "qcompile" quantizer with diffusers
from diffusers import {cls}
model = {cls}.from_pretrained("<this folder>")
```
"""
)


def weights_name(variant: str | None = None) -> str:
    if not variant:
        return WEIGHTS_NAME
    return WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")


def index_name(variant: str | None = None) -> str:
    """diffusers' shard index name; the variant goes before `.json`."""
    return INDEX_NAME.replace(".json", f".{variant}.json") if variant else INDEX_NAME


# torch's CPU allocator aligns to 64 bytes; tensors read from safetensors are mmap'd at
# whatever offset they have in the file, and CPU BLAS kernels sum in a different order
# for misaligned operands (the same weights gave different outputs after a reload).
CPU_ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or an owned copy of it if it sits on the CPU misaligned."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
        return tensor.detach().clone()
    return tensor


def align_cpu_tensors(model: nn.Module) -> None:
    """Re-home `model`'s misaligned CPU parameters and buffers (see `aligned`): a model
    from diffusers' `from_pretrained` keeps them mmap'd at file offsets, and CPU kernels
    sum misaligned operands in another order, so a quantized model and its reload would
    differ in the last bits. Both go through here and compute alike."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and aligned(tensor) is not tensor:
                    copy = aligned(tensor)
                    is_param = isinstance(tensor, nn.Parameter)
                    table[name] = nn.Parameter(copy, requires_grad=False) if is_param else copy


def tensor_crc32(tensor: torch.Tensor) -> int:
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return zlib.crc32(data)


def save(
    module: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = DEFAULT_SHARD_SIZE,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """Write `module` (quantized by qcompile) as a checkpoint folder, atomically.

    Also installed as the quantized model's `save_pretrained`, so pipelines save it too.
    A failure or crash mid-save leaves an earlier checkpoint at `save_directory` intact.
    Past `max_shard_size` (bytes or "10GB"-style, diffusers' default) the weights are
    split into diffusers' shards plus index json, which diffusers and `load` both read.
    """
    state = getattr(module, "qcompile_state", None)
    if state is None or not hasattr(module, "save_config"):
        raise QCompileError(
            "qcompile.save needs a diffusers model quantized by qcompile.quantize or loaded "
            f"from a qcompile checkpoint; got {type(module).__name__}"
        )
    if not safe_serialization:
        raise CheckpointError("qcompile checkpoints are safetensors only: safe_serialization=True")
    if push_to_hub:
        raise CheckpointError("push_to_hub is not supported: save the folder, then upload it")
    if kwargs:
        logger.warning("qcompile.save ignores %s", sorted(kwargs))
    if not is_main_process:
        return
    # A fused group's members are row views of one tensor (row_groups.py); safetensors
    # refuses tensors that share storage, so those are written from their own copies.
    tensors = {
        name: t.detach().clone() if shares_storage(t) else t.detach().contiguous()
        for name, t in module.state_dict().items()
    }
    crcs = {name: tensor_crc32(t) for name, t in tensors.items()}
    existing = Path(save_directory) / README_NAME
    with atomic_directory(save_directory, owns=partial(_owned, variant=variant)) as staging:
        module.save_config(staging)
        _save_weights(tensors, crcs, staging, variant, max_shard_size or DEFAULT_SHARD_SIZE)
        if state.runtime is not None:
            save_program(state.runtime.program, staging / PROGRAM_NAME)
        if not existing.is_file() or existing.read_text(errors="replace").startswith(README_HEAD):
            readme = _README.format(recipe=state.recipe.name, cls=type(module).__name__)
            (staging / README_NAME).write_text(readme)  # a user's own README is kept
    logger.info("saved %s to %s", type(module).__name__, save_directory)


def _save_weights(
    tensors: dict[str, torch.Tensor],
    crcs: dict[str, int],
    directory: Path,
    variant: str | None,
    max_shard_size: int | str,
) -> None:
    """One safetensors file, or diffusers' shards and index when it would exceed
    `max_shard_size`; each file's header carries the CRC32s of its own tensors."""
    pattern = weights_name(variant).replace(".safetensors", "{suffix}.safetensors")
    try:
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=pattern, max_shard_size=max_shard_size
        )
    except ValueError as exc:
        raise CheckpointError(f"max_shard_size={max_shard_size!r} is invalid ({exc})") from exc
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors[name] for name in names}
        shard_crcs = json.dumps({name: crcs[name] for name in names}, separators=(",", ":"))
        save_file(shard, directory / filename, metadata={"format": "pt", CRC_KEY: shard_crcs})
        _sort_metadata(directory / filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (directory / index_name(variant)).write_text(json.dumps(index, indent=2, sort_keys=True))


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place.

    safetensors keeps metadata in a hash map whose order varies from run to run, so two
    saves of identical tensors could differ in their header bytes; sorted, equal inputs
    give bit-identical files. The header keeps its length (the same keys and values).
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # not expected: the same content never grows
            return
        f.seek(8)
        f.write(text.ljust(length))


def weight_files(directory: Path, variant: str | None = None) -> dict[str, Path]:
    """Tensor name → the file holding it: the single weights file, or the shards its
    index json names (checked to lie inside `directory`)."""
    index_path = directory / index_name(variant)
    single = directory / weights_name(variant)
    if single.is_file() or not index_path.is_file():
        return {}  # the caller reads the single file (or reports it missing)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: directory / str(file) for name, file in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index ({exc!r})") from exc
    for path in set(files.values()):
        if path.parent != directory or not path.is_file():
            raise CheckpointError(f"{index_path} names shard {path.name!r}, which is missing")
    return files


def _owned(name: str, variant: str | None) -> bool:
    """Files a save of `variant` replaces: its config, program and weights, including
    the shards and index of an earlier sharded save of the same variant (diffusers would
    load a stale index before the single file). Everything else in the folder is kept.
    """
    stem = weights_name(variant).removesuffix(".safetensors")
    shard = re.fullmatch(re.escape(stem) + r"-\d+-of-\d+\.safetensors", name)
    owned = (CONFIG_NAME, PROGRAM_NAME, weights_name(variant), index_name(variant))
    return name in owned or bool(shard)


def read_config(directory: Path) -> tuple[dict[str, Any], QCompileConfig]:
    """The model config and its QCompileConfig; errors name config.json and the problem."""
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: not a model folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "qcompile":
        raise CheckpointError(f"{path} has no qcompile quantization_config")
    try:
        return config, QCompileConfig.from_dict(quant)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def read_checksums(path: Path) -> dict[str, int]:
    """Per-tensor CRC32s recorded in a safetensors header (empty if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from exc
    try:
        return {k: int(v) for k, v in json.loads(metadata.get(CRC_KEY, "{}")).items()}
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed {CRC_KEY} metadata ({exc})") from exc


def verify_tensor(path: Path, name: str, tensor: torch.Tensor, crcs: dict[str, int]) -> None:
    if name in crcs and tensor_crc32(tensor) != crcs[name]:
        raise CheckpointError(
            f"{path}: tensor {name!r} is corrupted (CRC32 differs from the one recorded at "
            "save time); re-download or re-save the checkpoint"
        )


def load(directory: str | os.PathLike, variant: str | None = None) -> ExportedProgram:
    """The checkpoint's lowered program with its weights, runnable without the model class.

    `load(dir).module()(**inputs)` runs it; the call must use the capture's arguments
    (return_dict=False included).
    """
    directory = Path(directory)
    _, config = read_config(directory)
    program = load_program(directory / (config.program or PROGRAM_NAME))
    single = directory / weights_name(variant)
    files = weight_files(directory, variant)
    missing = [name for name in program.state_dict if files and name not in files]
    if missing:
        raise CheckpointError(
            f"{directory / index_name(variant)}: tensors the program needs are missing "
            f"from the index: {missing[:8]}"
        )
    for path in sorted(set(files.values())) or [single]:
        names = [n for n in program.state_dict if files.get(n, single) == path]
        _load_tensors(program, path, names)
    return program


def _load_tensors(program: ExportedProgram, path: Path, names: list[str]) -> None:
    """Read `names` from one safetensors file into the program, checked."""
    crcs = read_checksums(path)
    with safe_open(str(path), framework="pt") as f:
        available = set(f.keys())
        for name in names:
            meta = program.state_dict[name]
            if name not in available:
                raise CheckpointError(f"{path}: tensor {name!r} the program needs is missing")
            tensor = aligned(f.get_tensor(name))
            verify_tensor(path, name, tensor, crcs)
            if tensor.dtype != meta.dtype or tensor.shape != meta.shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, the "
                    f"program expects {meta.dtype}{list(meta.shape)}"
                )
            if isinstance(meta, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=False)
            program.state_dict[name] = tensor
