"""Saves are atomic: a failure or a crash mid-save leaves the earlier checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qcompile
from qcompile import atomic
from qcompile.atomic import atomic_directory
from qcompile.tiny import sd3_eval_inputs, tiny_sd3


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture
def first(tmp_path):
    """A checkpoint already at the path, and the output it must keep giving."""
    model = qcompile.quantize(tiny_sd3(seed=0), "int8-wo")
    inputs = sd3_eval_inputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", inputs, _out(model, inputs)


def _intact(folder, inputs, expected):
    reloaded = type(tiny_sd3()).from_pretrained(folder)
    assert torch.equal(_out(reloaded, inputs), expected)
    leftovers = [p.name for p in folder.parent.iterdir() if "qcompile-" in p.name]
    return leftovers


def test_failure_mid_save_keeps_the_old_checkpoint(first, monkeypatch):
    folder, inputs, expected = first
    second = qcompile.quantize(tiny_sd3(seed=1), "int4-wo")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qcompile.checkpoint.save_program", fail)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(folder)
    assert _intact(folder, inputs, expected) == []  # and no staging folder left behind


def test_crash_mid_save_keeps_the_old_checkpoint(first):
    folder, inputs, expected = first
    script = textwrap.dedent(f"""
        import os, qcompile, qcompile.checkpoint
        from qcompile.tiny import tiny_sd3
        model = qcompile.quantize(tiny_sd3(seed=1), "int4-wo")
        def crash(*args, **kwargs):
            os._exit(9)  # the process dies with the weights written, the program not
        qcompile.checkpoint.save_program = crash
        model.save_pretrained({str(folder)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr[-2000:]
    leftovers = _intact(folder, inputs, expected)
    assert all(name.startswith(".ckpt.qcompile-tmp-") for name in leftovers)


def test_successful_save_replaces_the_checkpoint(first):
    folder, inputs, _ = first
    second = qcompile.quantize(tiny_sd3(seed=1), "int4-wo")
    second.save_pretrained(folder)
    assert _intact(folder, inputs, _out(second, inputs)) == []


def test_two_rename_fallback_where_exchange_is_unavailable(first, monkeypatch):
    folder, inputs, _ = first
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    second = qcompile.quantize(tiny_sd3(seed=1), "int4-wo")
    second.save_pretrained(folder)
    assert _intact(folder, inputs, _out(second, inputs)) == []


def test_atomic_directory_refuses_a_file_target(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError), atomic_directory(tmp_path / "file"):
        pass


def test_save_into_a_folder_keeps_what_it_does_not_own(tmp_path):
    # A user's folder: a plain diffusers save of the float model (sharded), notes, a
    # README of their own, a subfolder, and another variant's weights.
    folder = tmp_path / "models"
    float_model = tiny_sd3(seed=0)
    float_model.save_pretrained(folder, max_shard_size="200KB")
    shards = sorted(p.name for p in folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    (folder / "notes.txt").write_text("mine")
    (folder / "README.md").write_text("# my model card")
    (folder / "samples").mkdir()
    (folder / "samples" / "cat.txt").write_text("a cat")
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"another variant")
    folder.chmod(0o750)

    model = qcompile.quantize(tiny_sd3(seed=1), "int8-wo")
    inputs = sd3_eval_inputs(model)
    model.save_pretrained(folder)

    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "README.md").read_text() == "# my model card"
    assert (folder / "samples" / "cat.txt").read_text() == "a cat"
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").read_bytes() == b"another variant"
    # the earlier save of the same variant is replaced, shards and index included:
    # diffusers would load a stale index before the single file
    assert not (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert not any((folder / name).exists() for name in shards)
    assert (folder.stat().st_mode & 0o777) == 0o750
    assert _intact(folder, inputs, _out(model, inputs)) == []


def test_a_new_checkpoint_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        qcompile.quantize(tiny_sd3(seed=0), "int8-wo").save_pretrained(tmp_path / "new")
    finally:
        os.umask(umask)
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    assert (tmp_path / "new" / "README.md").read_text().startswith("# qcompile checkpoint")


def test_failed_save_leaves_a_users_files_alone(first, monkeypatch):
    folder, inputs, expected = first
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr("qcompile.checkpoint.save_program", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        qcompile.quantize(tiny_sd3(seed=1), "int4-wo").save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert _intact(folder, inputs, expected) == []
