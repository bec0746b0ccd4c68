"""Quantize a model whose weights accelerate offloads (disk or CPU, a `device_map`).

accelerate keeps offloaded weights on the meta device and swaps them in around each
submodule's forward (an `AlignDevicesHook` with a weights map). Such a model cannot be
exported as it is (the hooks assign real tensors inside the trace), and loading it whole
would defeat the offload. Instead qcompile takes the hooks off, captures the model on
the meta device, points the program's device literals at the hooks' execution device,
and reads each offloaded tensor from its weights map only when a pass needs it:
observation loads one op's weight at a time and frees it after its last use, packing
one linear at a time. What remains (biases, norms, embeddings) is loaded at the end,
so the result is an ordinary in-memory quantized model on the execution device.
Smoothing and low-rank folding rewrite the float weights of every quantized linear, so
those recipes hold them in memory while they run (logged).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from qcompile.checkpoint import aligned, weight_files
from qcompile.errors import CheckpointError, QCompileError
from qcompile.memory import release_freed_memory
from qcompile.runtime import retarget_devices

logger = logging.getLogger(__name__)

META = torch.device("meta")
# Freed weights stay on glibc's heap (see qcompile.memory): reading a tensor this large
# first hands the previous ones' pages back. Measured with
# benchmarks/cli_quantize_memory.py: --low-memory at float32 peaked at 427 MiB of
# anonymous memory without it.
TRIM_BYTES = 1 << 20
_trim_due = False  # a large tensor was read since the last trim (one flag for all readers)


def _trim_if_due(large_next: bool = False) -> None:
    """Trim if a large tensor was read since the last trim, or one is about to be."""
    global _trim_due
    if _trim_due or large_next:
        _trim_due = False
        release_freed_memory()


def _note_read(value: torch.Tensor) -> torch.Tensor:
    global _trim_due
    _trim_due = _trim_due or value.nbytes >= TRIM_BYTES
    return value


@dataclass
class Offloaded:
    """The weights maps of a model whose accelerate hooks were taken off."""

    maps: dict[str, Any]  # FQN of each module whose hook offloaded it → its weights map
    device: torch.device  # the hooks' execution device: where the quantized model lives
    hooks: list[tuple[nn.Module, Any, Any]]  # (module, hook, accelerate's forward wrapper)

    def restore(self) -> None:
        """Put accelerate's hooks back (quantization failed before changing the model)."""
        for sub, hook, wrapper in self.hooks:
            sub._old_forward, sub._hf_hook, sub.forward = sub.forward, hook, wrapper

    def load(self, fqn: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `fqn` (relative to the quantized module) from its weights map, on the
        execution device; floating values take `like`'s dtype, as accelerate casts them."""
        _trim_if_due(like is not None and like.nbytes >= TRIM_BYTES)
        parts = fqn.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            weights = self.maps.get(".".join(parts[:cut]))
            if weights is None:
                continue
            try:
                value = weights[".".join(parts[cut:])]
            except KeyError:
                continue
            _note_read(value)
            if like is not None and value.is_floating_point():
                value = value.to(like.dtype)
            return aligned(value.to(self.device))  # computes as the model in memory does
        raise KeyError(f"{fqn} is on the meta device and no accelerate weights map holds it")


def detach_offload(module: nn.Module) -> Offloaded | None:
    """Take accelerate's hooks off `module` if they offload weights; their maps, or None.

    A model with hooks that only place it on devices (a `device_map` without offload) is
    left as it is: it captures and runs with them.
    """
    hooked = [(n, m) for n, m in module.named_modules() if hasattr(m, "_hf_hook")]
    maps, devices = {}, set()
    for name, sub in hooked:
        for hook in getattr(sub._hf_hook, "hooks", (sub._hf_hook,)):  # a SequentialHook
            if type(hook).__name__ == "CpuOffload":
                raise QCompileError(
                    f"{type(module).__name__} has model CPU offload hooks (the pipeline's "
                    "enable_model_cpu_offload): quantize it before enabling offload, or "
                    "call pipe.remove_all_hooks() first"
                )
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                maps[name] = hook.weights_map
                devices.add(torch.device(hook.execution_device))
    if not maps:
        return None
    if len(devices) != 1:
        raise QCompileError(
            f"{type(module).__name__} is offloaded to several execution devices "
            f"{sorted(map(str, devices))}: offload it to one to quantize it"
        )
    hooks = [(sub, sub._hf_hook, sub.forward) for _, sub in hooked]
    for _, sub in hooked:  # what accelerate's remove_hook_from_module does, minus
        sub.forward = sub._old_forward  # detach_hook, which would load every weight back
        del sub._hf_hook, sub._old_forward
    offloaded = Offloaded(maps, devices.pop(), hooks)
    logger.info(
        "%s: accelerate offloads %d modules; quantizing from their weights maps on %s",
        type(module).__name__,
        len(maps),
        offloaded.device,
    )
    return offloaded


@contextlib.contextmanager
def on_meta(module: nn.Module) -> Iterator[None]:
    """Every parameter and buffer of `module` on the meta device for the duration."""
    saved = []
    for sub in module.modules():
        for kind in (sub._parameters, sub._buffers):
            for name, tensor in kind.items():
                if tensor is not None and not tensor.is_meta:
                    saved.append((kind, name, tensor))
                    meta = tensor.to(META)
                    kind[name] = nn.Parameter(meta, False) if kind is sub._parameters else meta
    try:
        yield
    finally:
        for kind, name, tensor in saved:
            kind[name] = tensor


def to_meta(value: Any) -> Any:
    """`value` (a kwargs dict of a forward) with every tensor on the meta device."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(META), value)


def finish_capture(program: ExportedProgram, module: nn.Module, device: torch.device) -> None:
    """Make a program captured on meta read as if captured on `device`.

    The graph's device literals (arange, zeros, asserts) name `device`; its state holds
    the module's real tensors where there are any (the offloaded ones stay meta until a
    pass loads them).
    """
    graph = program.graph_module
    retarget_devices(graph, META, device)
    vals = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    with detect_fake_mode(vals):  # the passes compute new nodes' values next to these

        def move(fake: torch.Tensor) -> torch.Tensor:
            return fake.to(device) if fake.device == META else fake

        for node in graph.graph.nodes:
            if "val" in node.meta:
                node.meta["val"] = pytree.tree_map_only(torch.Tensor, move, node.meta["val"])
    real = {n: t for n, t in _named_tensors(module) if not t.is_meta}
    tables = {
        InputKind.PARAMETER: program.state_dict,
        InputKind.BUFFER: program.state_dict,
        InputKind.CONSTANT_TENSOR: program.constants,
    }
    for spec in program.graph_signature.input_specs:
        table = tables.get(spec.kind)
        if table is not None and spec.target in real and table[spec.target].is_meta:
            table[spec.target] = real[spec.target]


def load_linear_weights(
    program: ExportedProgram, fqns: Iterable[str], offloaded: Offloaded | None
) -> None:
    """Read the float weights of linears `fqns` into the program's state: smoothing and
    low-rank folding rewrite them there."""
    if offloaded is None:
        return
    loaded = 0
    for fqn in fqns:
        name = f"{fqn}.weight"
        if program.state_dict[name].is_meta:
            program.state_dict[name] = offloaded.load(name, program.state_dict[name])
            loaded += program.state_dict[name].nbytes
    if loaded:
        logger.info("loaded %.1f MiB of offloaded weights to rewrite them", loaded / 2**20)


def materialize(module: nn.Module, offloaded: Offloaded) -> None:
    """Load every tensor of `module` still on the meta device from the weights maps."""
    for name, sub in module.named_modules():
        for kind in (sub._parameters, sub._buffers):
            for attr, tensor in kind.items():
                if tensor is not None and tensor.is_meta:
                    value = offloaded.load(f"{name}.{attr}" if name else attr, tensor)
                    if kind is sub._parameters:
                        value = nn.Parameter(value, requires_grad=False)
                    kind[attr] = value


class ShardWeights(Mapping):
    """A diffusers model folder's safetensors shards as {FQN: tensor}, each tensor read
    from its (memory-mapped) shard only when asked for: accelerate's weights map for a
    model built on the meta device, so no float copy of the whole model ever exists."""

    def __init__(self, folder: Path) -> None:
        self._files = weight_files(folder)  # diffusers' shard index, its shards checked
        if not self._files:
            shards = sorted(folder.glob("*.safetensors"))
            if len(shards) != 1:
                raise CheckpointError(
                    f"{folder}: expected one .safetensors file or an index, found "
                    f"{[p.name for p in shards]}"
                )
            with safe_open(shards[0], "pt") as handle:
                self._files = dict.fromkeys(handle.keys(), shards[0])
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        _trim_if_due()  # accelerate dropped the last submodule's weights by now
        return _note_read(self._handles[path].get_tensor(key))

    def __contains__(self, key: object) -> bool:  # Mapping's default would read it
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def loaded_bytes(self, dtype: torch.dtype) -> int:
        """What the tensors take once read with floating ones cast to `dtype`, from the
        shards' headers alone (nothing is read)."""
        total = 0
        for path in set(self._files.values()):
            with safe_open(path, "pt") as handle:
                names = handle.keys()  # a safetensors handle is not iterable
                for key in names:
                    part = handle.get_slice(key)
                    kind = part.get_dtype()  # "F32", "BF16", "F8_E4M3", "I64", "BOOL", ...
                    if kind.startswith(("F", "BF")):
                        size = dtype.itemsize
                    else:
                        size = 1 if kind == "BOOL" else int(kind[1:]) // 8
                    total += math.prod(part.get_shape()) * size
        return total


def streamed_model(cls: type, folder: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """A diffusers model of class `cls` from `folder`, built on the meta device with
    accelerate hooks that read each submodule's weights from the shards as it runs.

    Calibrating through it keeps one submodule's float weights in memory at a time, and
    `qcompile.quantize` then packs it layer by layer (see `detach_offload`)."""
    from accelerate import cpu_offload, init_empty_weights

    weights = ShardWeights(folder)
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    model.register_to_config(_name_or_path=str(folder))  # as from_pretrained records it
    model.to(dtype).eval()
    for name, module in model.named_modules():  # as from_pretrained keeps them
        if any(part in (cls._keep_in_fp32_modules or ()) for part in name.split(".")):
            module.float()
    missing = [k for k in model.state_dict() if k not in weights]
    if missing:
        raise CheckpointError(f"{folder}: the shards lack {missing[:8]}")
    for key, buffer in model.named_buffers():  # persistent buffers: small, read now
        if key in weights:
            owner, _, attr = key.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = weights[key].to(buffer.dtype)
    cpu_offload(model, execution_device=torch.device(device), state_dict=weights)
    return model


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
