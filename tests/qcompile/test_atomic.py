"""Saves are atomic: a failure or a crash mid-save leaves the earlier checkpoint intact."""

from __future__ import annotations

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
