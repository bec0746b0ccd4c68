"""`qcompile demo` and `qcompile recipes`, as a user runs them."""

from __future__ import annotations

import shutil
import subprocess

from PIL import Image

from qcompile.cli import main

# Tiny-Flux transformer output on the pipeline's first real call (2 steps, 64×64),
# int8-wo vs float. Measured 63.6 dB on torch 2.13 CPU; floor 0.5 dB below.
DEMO_TRANSFORMER_SQNR_DB = 63.1


def test_demo_reports_and_writes_the_image(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    table = dict(line.split("  ", 1) for line in capsys.readouterr().out.strip().splitlines())
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["recipe"] == "int8-wo (float32)"
    assert table["transformer calls graph / eager"] == "2 / 0"
    assert table["reloaded: output / image bitwise equal"] == "True / True"
    assert table["reloaded: transformer calls on graph"] == "2"
    assert int(table["checkpoint bytes (all files)"].replace(",", "")) > 0
    assert "× smaller" in table["transformer bytes, quantized"]
    assert float(table["transformer output SQNR vs float"].split()[0]) > DEMO_TRANSFORMER_SQNR_DB
    phases = (
        "build pipeline",
        "float pipeline",
        "quantize",
        "quantized pipeline",
        "save checkpoint",
        "reload (from_pretrained)",
        "reloaded pipeline",
    )
    for phase in phases:
        assert float(table[f"seconds: {phase}"]) > 0
    image = Image.open(table["image"])
    assert image.size == (64, 64)


def test_demo_with_unknown_recipe_fails_cleanly(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--recipe", "int2-wo"]) == 2
    assert "unknown recipe 'int2-wo'; valid recipes:" in capsys.readouterr().err


def test_console_script_lists_recipes():
    exe = shutil.which("qcompile")
    assert exe, "the qcompile console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "recipes"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in done.stdout.splitlines()]
    # every preset, sorted, one per line — the subprocess sees the same registry
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"int8-wo", "fp8-dynamic", "int8-w8a8", "svdq-w4a4", "nvfp4", "mxfp4-wo"} <= set(names)
    assert {f"{f}-svdq-w4a4" for f in ("flux", "sd3", "sdxl")} <= set(names)
