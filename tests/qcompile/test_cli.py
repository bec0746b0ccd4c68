"""`qcompile demo` and `qcompile recipes`, as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from qcompile.cli import main
from qcompile.errors import QCompileError

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
    assert (
        "unknown recipe 'int2-wo'; did you mean 'int8-wo' or 'int4-wo'" in capsys.readouterr().err
    )


def test_console_script_lists_recipes():
    exe = shutil.which("qcompile")
    assert exe, "the qcompile console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "recipes"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in done.stdout.splitlines()]
    # every preset, sorted, one per line — the subprocess sees the same registry
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"int8-wo", "fp8-dynamic", "int8-w8a8", "svdq-w4a4", "nvfp4", "mxfp4-wo"} <= set(names)
    assert {f"{f}-svdq-w4a4" for f in ("flux", "sd3", "sdxl")} <= set(names)


def test_demo_calibrates_a_recipe_that_needs_it(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path), "--recipe", "int8-w8a8", "--steps", "1"]
    assert main([*args, "--size", "32"]) == 0
    table = dict(line.split("  ", 1) for line in capsys.readouterr().out.strip().splitlines())
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["recipe"] == "int8-w8a8 (float32)"
    assert float(table["seconds: calibrate"]) > 0
    assert table["transformer calls graph / eager"] == "1 / 0"


def test_recipes_is_a_table_and_json_on_request(capsys):
    assert main(["recipes"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert (
        "weights int8 per_channel; activations int8 static; needs calibration" in rows["int8-w8a8"]
    )
    assert "activations 16-bit; no calibration" in rows["int4-wo"]
    assert "{" not in "".join(rows.values())  # no raw JSON
    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in recipes} == set(rows)


def test_help_and_version_answer_without_importing_torch():
    # `qcompile --help` imported torch and diffusers first (12-40 s on a cold cache).
    code = (
        "import sys, qcompile_cli\n"
        "try:\n    qcompile_cli.main(['--version'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\n"
        "qcompile_cli.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules and 'qcompile' not in sys.modules, 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("qcompile 0.")


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_prompt_counts_below_one_are_refused(count, capsys):
    # --num-prompts 0 calibrated on all 64 prompts; -1 on 63.
    for command in (["quantize", "x", "--recipe", "int8-w8a8"], ["eval", "x", "--reference", "y"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--num-prompts", count])
        assert exit_.value.code == 2
        assert "--num-prompts" in capsys.readouterr().err


def test_prompt_counts_are_checked_through_the_api_too():
    from qcompile.commands import check_count

    assert check_count(None, "n") is None and check_count(3, "n") == 3
    for bad in (0, -1, True, 2.0):
        with pytest.raises(QCompileError, match="must be at least 1"):
            check_count(bad, "num_prompts")


def test_device_without_cuda_names_the_fix(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["quantize", "x", "--recipe", "int8-wo", "--device", "cuda"]
    assert main(args) == 2
    assert "pass --device cpu" in capsys.readouterr().err
    assert main(["quantize", "x", "--recipe", "int8-wo", "--device", "gpu0"]) == 2
    assert "is not a device" in capsys.readouterr().err


def test_a_misspelled_recipe_gets_a_suggestion_everywhere(capsys):
    assert main(["quantize", "x", "--recipe", "int8-w0"]) == 2
    assert "did you mean 'int8-wo'" in capsys.readouterr().err


def test_bench_and_eval_say_what_their_numbers_mean():
    from qcompile.cli import _format_bench, _format_eval

    row = {"seconds": 2.0, "peak_gib": None, "weight_bytes": 1, "graph_calls": 3}
    slower = _format_bench({"rows": {"quantized": {**row, "speedup": 0.5, "eager_calls": 1}}})
    assert "2.00× slower than the reference" in slower and "graph / eager 3 / 1" in slower
    faster = _format_bench({"rows": {"quantized": {**row, "speedup": 1.25, "eager_calls": 0}}})
    assert "1.25× faster than the reference" in faster
    summary = {"transformer_sqnr_db": 40, "image_psnr_db": 30, "image_ssim": 0.9}
    report = {"component": "unet", "prompts": [1], "summary": {**summary, "worst_layer": None}}
    assert "unet SQNR (mean)" in _format_eval({**report, "files": {}})
