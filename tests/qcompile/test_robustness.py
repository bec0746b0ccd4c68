"""Checkpoints under abuse: out-of-range header offsets, bit flips in the header, a
program from another model, concurrent saves to one path, and bit-identical output of
identical runs. Each bad file is a clear error, never a hang or a silently wrong model."""

from __future__ import annotations

import json
import shutil
import struct
import threading

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors import SafetensorError

import qcompile
from qcompile import CheckpointError
from qcompile.checkpoint import WEIGHTS_NAME
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.tiny import tiny_flux, tiny_sd3

PACKED = "transformer_blocks.0.attn.to_q.weight"
# What a damaged file may raise: ours, or diffusers' OSError wrapping safetensors'.
REFUSED = (CheckpointError, OSError, SafetensorError)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    qcompile.quantize(tiny_sd3(), "int8-wo").save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def _header(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def _write_header(path, header: dict) -> None:
    """Replace the JSON header (padded to 8 bytes, as safetensors writes it); the data
    after it is unchanged, and offsets count from its start."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header, separators=(",", ":")).encode()
    text = text.ljust(-(-len(text) // 8) * 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize("offsets", [(0, 10**12), (10**12, 10**12 + 16), (64, 32)])
def test_header_offsets_out_of_range_are_refused(ckpt, offsets):
    path = ckpt / WEIGHTS_NAME
    _, header = _header(path)
    header[PACKED]["data_offsets"] = list(offsets)
    _write_header(path, header)
    with pytest.raises(CheckpointError, match="unreadable") as info:
        qcompile.load(ckpt)
    assert str(path) in str(info.value)
    with pytest.raises(REFUSED):
        SD3Transformer2DModel.from_pretrained(ckpt)


def test_every_bit_flip_in_the_header_is_refused_or_harmless(saved, tmp_path):
    """Flip one bit at positions spread over the whole header: the load either fails
    with a clear error or gives exactly the saved tensors (a flip in padding or in
    metadata nothing reads)."""
    path = saved / WEIGHTS_NAME
    length, _ = _header(path)
    reference = qcompile.load(saved).state_dict
    outcomes = {"refused": 0, "identical": 0}
    for position in range(8, 8 + length, max(1, length // 12)):
        ckpt = shutil.copytree(saved, tmp_path / f"flip{position}")
        data = bytearray((ckpt / WEIGHTS_NAME).read_bytes())
        data[position] ^= 0x04
        (ckpt / WEIGHTS_NAME).write_bytes(bytes(data))
        try:
            program = qcompile.load(ckpt)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        assert program.state_dict.keys() == reference.keys(), position
        for name, tensor in reference.items():
            assert torch.equal(program.state_dict[name], tensor), (position, name)
        outcomes["identical"] += 1
    assert outcomes["refused"] > 0


def test_a_program_from_another_model_is_refused(ckpt, tmp_path):
    other = tmp_path / "flux"
    qcompile.quantize(tiny_flux(), "int8-wo").save_pretrained(other)
    shutil.copy(other / PROGRAM_NAME, ckpt / PROGRAM_NAME)
    with pytest.raises(CheckpointError, match="does not belong to this SD3Transformer2DModel"):
        SD3Transformer2DModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="the program needs is missing"):
        qcompile.load(ckpt)


def test_a_program_from_a_wider_model_of_the_same_class_is_refused(ckpt, tmp_path):
    wide = tmp_path / "wide"
    config = {**tiny_sd3().config, "joint_attention_dim": 96}
    model = SD3Transformer2DModel.from_config(config)
    qcompile.quantize(model, "int8-wo").save_pretrained(wide)
    shutil.copy(wide / PROGRAM_NAME, ckpt / PROGRAM_NAME)
    with pytest.raises(CheckpointError, match=r"reads '.*' as \(\d+, \d+\)"):
        SD3Transformer2DModel.from_pretrained(ckpt)


def test_concurrent_saves_to_one_path_never_interleave(tmp_path):
    models = {recipe: qcompile.quantize(tiny_sd3(), recipe) for recipe in ("int8-wo", "int4-wo")}
    target = tmp_path / "ckpt"

    def save(model, barrier, errors):
        barrier.wait()
        try:
            model.save_pretrained(target)
        except Exception as exc:
            errors.append(exc)

    for _ in range(3):
        barrier, errors = threading.Barrier(len(models)), []
        threads = [
            threading.Thread(target=save, args=(m, barrier, errors)) for m in models.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        loaded = SD3Transformer2DModel.from_pretrained(target)  # one whole checkpoint
        winner = models[loaded.qcompile_state.recipe.name]
        for name, tensor in winner.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        assert not list(tmp_path.glob(".ckpt.qcompile-tmp-*"))


def test_same_recipe_and_calibration_give_bit_identical_checkpoints(tmp_path):
    from qcompile.tiny import sd3_eval_inputs

    calibration = [sd3_eval_inputs(tiny_sd3(), seed=s) for s in (1, 2)]
    for run in ("a", "b"):
        model = qcompile.quantize(tiny_sd3(), "int8-w8a8", calibration=calibration)
        model.save_pretrained(tmp_path / run)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
