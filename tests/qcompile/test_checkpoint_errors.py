"""Bad checkpoints fail with a message naming the problem and the file; nothing unpickles."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

import qcompile
from qcompile import CheckpointError
from qcompile.checkpoint import CRC_KEY, WEIGHTS_NAME, tensor_crc32
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.tiny import tiny_sd3

PACKED = "transformer_blocks.0.attn.to_q.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    qcompile.quantize(tiny_sd3(), "int8-wo").save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def _loaders(folder):
    return {
        "from_pretrained": lambda: SD3Transformer2DModel.from_pretrained(folder),
        "qcompile.load": lambda: qcompile.load(folder),
    }


def _rewrite(folder, change, keep_crc=True):
    """Rewrite the weights file with `change(tensors)` applied; CRCs recomputed or kept."""
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - not iterable
        metadata = f.metadata()
    change(tensors)
    if not keep_crc:
        crcs = {k: tensor_crc32(t) for k, t in tensors.items()}
        metadata[CRC_KEY] = json.dumps(crcs)
    save_file(tensors, path, metadata=metadata)


def _chain(exc):
    """Every message in an exception's context chain (diffusers re-raises as OSError)."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def test_truncated_weights(ckpt):
    path = ckpt / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="Unable to load weights from checkpoint file") as info:
        SD3Transformer2DModel.from_pretrained(ckpt)  # diffusers reads the file before us
    assert str(path) in str(info.value)
    assert "incomplete metadata, file not fully covered" in _chain(info.value)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: unreadable"):
        qcompile.load(ckpt)


def test_corrupted_header(ckpt):
    path = ckpt / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(OSError, match="Unable to load weights") as info:
        SD3Transformer2DModel.from_pretrained(ckpt)
    assert "invalid JSON in header" in _chain(info.value)
    with pytest.raises(CheckpointError, match="invalid JSON in header"):
        qcompile.load(ckpt)


def test_corrupted_tensor_bytes_fail_the_crc(ckpt):
    def flip(tensors):
        tensors[PACKED].view(-1)[5] ^= 0x10

    _rewrite(ckpt, flip, keep_crc=True)
    for name, load in _loaders(ckpt).items():
        with pytest.raises(CheckpointError, match=rf"tensor '{PACKED}' is corrupted"):
            load()
        assert name


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda q: q.update(layers={PACKED[:-7]: "s9"}), r"unknown scheme ids \['s9'\]"),
        (lambda q: q["schemes"]["s0"]["weight"].update(format="int7"), "a scheme is invalid"),
        (lambda q: q.update(recipe={"name": "x"}), "recipe is invalid"),
        (lambda q: q.update(surprise=1), r"unknown fields \['surprise'\]"),
        (lambda q: q.update(layers=[1, 2]), "layers must map layer names"),
        (lambda q: q.update(format_version=2), "format_version 2 is newer than this qcompile"),
    ],
)
def test_malformed_quantization_config(ckpt, edit, match):
    _edit_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=f"config.json quantization_config: .*{match}"):
        SD3Transformer2DModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=rf"config.json: .*{match}"):
        qcompile.load(ckpt)


def test_layer_the_model_does_not_have(ckpt):
    _edit_config(ckpt, lambda q: q["layers"].update({"transformer_blocks.0.nope": "s0"}))
    with pytest.raises(CheckpointError, match=r"lists layer 'transformer_blocks\.0\.nope'"):
        SD3Transformer2DModel.from_pretrained(ckpt)


def test_tensor_dtype_disagreeing_with_scheme(ckpt):
    def as_uint8(tensors):
        tensors[PACKED] = tensors[PACKED].view(torch.uint8)

    _rewrite(ckpt, as_uint8, keep_crc=True)  # same bytes: the CRC still matches
    expected = rf"'{PACKED}' is torch.uint8\[64, 64\], .*expects torch.int8\[64, 64\]"
    for load in _loaders(ckpt).values():
        with pytest.raises(CheckpointError, match=expected):
            load()


def test_tensor_shape_disagreeing_with_scheme(ckpt):
    def drop_row(tensors):
        tensors[PACKED] = tensors[PACKED][:-1].contiguous()

    _rewrite(ckpt, drop_row, keep_crc=False)  # a self-consistent but wrong checkpoint
    with pytest.raises(CheckpointError, match=rf"'{PACKED}' has shape \[63, 64\].*\[64, 64\]"):
        SD3Transformer2DModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=rf"'{PACKED}' is torch.int8\[63, 64\]"):
        qcompile.load(ckpt)


def test_missing_quantized_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop(PACKED + "_scale"), keep_crc=False)
    with pytest.raises(CheckpointError, match=r"lacks quantized tensors \['.*to_q.weight_scale'\]"):
        SD3Transformer2DModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match=r"to_q\.weight_scale' the program needs is missing"):
        qcompile.load(ckpt)


def test_missing_program_is_recaptured(ckpt):
    (ckpt / PROGRAM_NAME).unlink()
    model = SD3Transformer2DModel.from_pretrained(ckpt)
    inputs = qcompile.tiny.sd3_eval_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert qcompile.runtime_of(model).last_path == "graph"


def test_without_import_qcompile_the_error_names_qcompile(saved):
    script = textwrap.dedent(f"""
        from diffusers import SD3Transformer2DModel
        SD3Transformer2DModel.from_pretrained({str(saved)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Unknown quantization type, got qcompile" in done.stderr
    assert "import qcompile" in (saved / "README.md").read_text()


class _Planted:
    """Unpickling this touches a marker file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replace_member(archive_path, suffix, data):
    rebuilt = archive_path.with_suffix(".tmp")
    with zipfile.ZipFile(archive_path) as src, zipfile.ZipFile(rebuilt, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, data if item.filename.endswith(suffix) else src.read(item))
    rebuilt.replace(archive_path)


def test_planted_pickles_never_run(ckpt, tmp_path):
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Planted(marker))
    (ckpt / "diffusion_pytorch_model.bin").write_bytes(payload)
    (ckpt / "qcompile_state.pkl").write_bytes(payload)
    _replace_member(ckpt / PROGRAM_NAME, "sample_inputs/model.pt", payload)
    model = SD3Transformer2DModel.from_pretrained(ckpt)
    program = qcompile.load(ckpt)
    assert qcompile.runtime_of(model) is not None and program.graph is not None
    assert not marker.exists()


def test_pickled_archive_members_are_refused(ckpt, tmp_path):
    marker = tmp_path / "pickle-ran"
    archive = ckpt / PROGRAM_NAME
    with zipfile.ZipFile(archive) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    _replace_member(archive, "model_weights_config.json", json.dumps(config).encode())
    with pytest.raises(CheckpointError, match=f"archive member for '{first}' is pickled"):
        qcompile.load(ckpt)
    archive.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(CheckpointError, match=r"not a readable \.pt2 archive"):
        SD3Transformer2DModel.from_pretrained(ckpt)
    assert not marker.exists()


def test_an_unreadable_program_says_deleting_it_recaptures_it(ckpt):
    archive = ckpt / PROGRAM_NAME
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # truncated
    for load in _loaders(ckpt).values():
        with pytest.raises(CheckpointError, match="delete it and loading captures the program"):
            load()
    archive.unlink()  # as the message says: the load captures it again
    model = SD3Transformer2DModel.from_pretrained(ckpt)
    assert qcompile.runtime_of(model) is not None


def test_the_program_reader_reads_the_schema_as_torch_does(saved):
    # qcompile.pt2 reads the program's JSON itself (type hints resolved once per class);
    # this fails when torch's schema or its reader's rules move away from it.
    from torch._export.serde import schema
    from torch._export.serde.serialize import _bytes_to_dataclass

    from qcompile.pt2 import schema_from_json

    with zipfile.ZipFile(saved / PROGRAM_NAME) as archive:
        members = [n for n in archive.namelist() if n.endswith(".json")]
        program = next(n for n in members if "/models/" in f"/{n}")
        raw = archive.read(program)
        assert schema_from_json(schema.ExportedProgram, raw) == _bytes_to_dataclass(
            schema.ExportedProgram, raw
        )
        for member in (n for n in members if n.endswith("_config.json")):
            raw = archive.read(member)
            assert schema_from_json(schema.PayloadConfig, raw) == _bytes_to_dataclass(
                schema.PayloadConfig, raw
            )
