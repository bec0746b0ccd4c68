"""`qcompile quantize / inspect / eval / bench` end to end on an offline tiny pipeline
folder, through the command line's entry point (and once through the console script)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from qcompile.checkpoint import WEIGHTS_NAME
from qcompile.cli import main
from qcompile.evaluation import GRID_HEADER

# Tiny-Flux transformer output, int8-w8a8 calibrated on 2 prompts × 2 steps, on held-out
# prompts at 64²: measured 48.1 dB (torch 2.13 CPU); floor 3 dB below for thread counts.
EVAL_TRANSFORMER_SQNR_DB = 45.0
# Each int8 layer alone on its float input: measured 36.4 dB at the worst (proj_out).
EVAL_LAYER_SQNR_DB = 33.0
RUN = ["--steps", "2", "--size", "64", "--dtype", "float32", "--device", "cpu"]


def _table(text: str) -> dict[str, str]:
    rows = [line.split("  ", 1) for line in text.strip().splitlines() if "  " in line]
    return {k.strip(): v.strip() for k, v in rows}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float tiny Flux pipeline folder, and its int8-w8a8 quantization by the CLI."""
    from qcompile.tiny import tiny_flux_pipeline

    root = tmp_path_factory.mktemp("cli")
    tiny_flux_pipeline().save_pretrained(root / "float")
    args = ["quantize", str(root / "float"), "--recipe", "int8-w8a8", "--num-prompts", "2"]
    assert main([*args, "--out", str(root / "int8"), *RUN]) == 0
    return root / "float", root / "int8"


def test_quantize_calibrates_quantizes_and_saves_a_loadable_pipeline(folders):
    from diffusers import DiffusionPipeline

    import qcompile

    _, quantized = folders
    pipe = DiffusionPipeline.from_pretrained(quantized)
    assert qcompile.runtime_of(pipe.transformer) is not None
    assert pipe.transformer.qcompile_state.recipe.name == "int8-w8a8"
    assert (quantized / "model_index.json").is_file()
    assert not list(quantized.parent.glob(".int8.qcompile-tmp-*"))  # staging cleaned up


def test_low_memory_quantize_writes_the_same_checkpoint(tmp_path, folders, monkeypatch):
    """--low-memory calibrates through accelerate hooks that read each submodule's
    weights from the shards, and packs layer by layer: the checkpoint is the same."""
    from qcompile.offload import Offloaded

    loads = []
    load = Offloaded.load
    monkeypatch.setattr(Offloaded, "load", lambda self, *a: loads.append(a[0]) or load(self, *a))
    source, quantized = folders
    args = ["quantize", str(source), "--recipe", "int8-w8a8", "--num-prompts", "2"]
    assert main([*args, "--out", str(tmp_path / "low"), "--low-memory", *RUN]) == 0
    assert "transformer_blocks.0.attn.to_q.weight" in loads  # packed from the shards
    for name in (WEIGHTS_NAME, "config.json"):
        want = (quantized / "transformer" / name).read_bytes()
        assert (tmp_path / "low" / "transformer" / name).read_bytes() == want


def test_low_memory_needs_a_local_folder(capsys):
    args = ["quantize", "org/not-downloaded", "--recipe", "int8-w8a8", "--low-memory", *RUN]
    assert main(args) == 2
    assert "--low-memory reads the weights from a local pipeline folder" in capsys.readouterr().err


def test_quantize_prints_what_it_did(tmp_path, folders, capsys):
    source, _ = folders
    out = tmp_path / "wo"
    assert main(["quantize", str(source), "--recipe", "int8-wo", "--out", str(out), *RUN]) == 0
    table = _table(capsys.readouterr().out)
    assert table["saved"] == str(out) and table["component"] == "transformer"
    assert table["calibration prompts"] == "0"  # weight-only: no calibration
    assert table["linears quantized"] == "40 of 50"
    assert "× smaller" in table["bytes after"]
    # weight-only: quantized while the weights load (streamed), never whole in float
    assert {"seconds: load and quantize", "seconds: save"} <= table.keys()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "int2-wo"], "unknown recipe 'int2-wo'"),
        (["--recipe", "int8-wo", "--component", "unet"], "has no component 'unet'"),
        (["--recipe", "int8-w8a8", "--prompts", "missing.txt"], "missing.txt"),
    ],
)
def test_quantize_refuses_bad_input_with_the_problem_named(folders, capsys, args, message):
    source, _ = folders
    assert main(["quantize", str(source), *args, *RUN]) == 2
    assert message in capsys.readouterr().err


def test_quantize_names_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["quantize", str(tmp_path), "--recipe", "int8-wo", *RUN]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_inspect_reports_the_checkpoint(folders, capsys):
    _, quantized = folders
    assert main(["inspect", str(quantized)]) == 0
    table = _table(capsys.readouterr().out)
    assert table["recipe"] == "int8-w8a8"
    assert table["linears quantized"] == "40 of 50"
    assert table["activation quantizations"] == "26 for 40 GEMMs (6 shared)"
    assert table["horizontal fusion"] == "20 linears in 6 GEMMs at run time"
    assert "linear_int8_w8a8 40" in table["qcompile ops"]
    assert table["transformer_blocks.0.attn.to_q"].split()[0] == "linear_int8_w8a8"

    assert main(["inspect", str(quantized / "transformer"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    quantized_layers = [r for r in report["layers"] if r["scheme"] != "unquantized"]
    assert len(quantized_layers) == report["linears_quantized"] == 40
    assert all(r["bytes"] < r["bytes_unquantized"] for r in quantized_layers)
    assert 0.5 < report["fraction_quantized"] < 1
    assert report["bytes"] < report["bytes_unquantized"]


def test_inspect_refuses_a_float_pipeline(folders, capsys):
    source, _ = folders
    assert main(["inspect", str(source)]) == 2
    assert "no qcompile-quantized component" in capsys.readouterr().err


def test_eval_writes_the_report_files(tmp_path, folders, capsys):
    source, quantized = folders
    out = tmp_path / "report"
    args = ["eval", str(quantized), "--reference", str(source), "--num-prompts", "2"]
    assert main([*args, "--out", str(out), *RUN]) == 0
    table = _table(capsys.readouterr().out)
    assert float(table["transformer SQNR (mean)"].split()[0]) > EVAL_TRANSFORMER_SQNR_DB
    report = json.loads((out / "report.json").read_text())  # strict JSON
    assert [row["prompt"] for row in report["prompts"]] == report_prompts(2)
    for row in report["prompts"]:
        assert row["transformer_sqnr_db"] > EVAL_TRANSFORMER_SQNR_DB
        assert 0 < row["image_ssim"] <= 1 and row["image_psnr_db"] > 20
    assert len(report["layers"]) == 40
    assert min(r["sqnr_db"] for r in report["layers"]) > EVAL_LAYER_SQNR_DB
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, GRID_HEADER + 2 * 64)
    chart = Image.open(out / "layers.png")
    assert chart.size[0] > 400 and chart.size[1] > 400


def report_prompts(count: int) -> list[str]:
    from qcompile.commands import CALIBRATION_COUNT
    from qcompile.prompts import CALIBRATION_PROMPTS

    return list(CALIBRATION_PROMPTS[CALIBRATION_COUNT : CALIBRATION_COUNT + count])


def test_eval_refuses_a_quantized_reference(folders, capsys):
    _, quantized = folders
    assert main(["eval", str(quantized), "--reference", str(quantized), *RUN]) == 2
    assert "pass the float one" in capsys.readouterr().err


def test_bench_times_both_pipelines_and_writes_json(tmp_path, folders, capsys):
    source, quantized = folders
    out = tmp_path / "bench.json"
    args = ["bench", str(quantized), "--reference", str(source), "--iters", "1"]
    assert main([*args, "--out", str(out), *RUN]) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert rows["quantized"]["weight_bytes"] < rows["reference"]["weight_bytes"]
    assert rows["quantized"]["speedup"] == pytest.approx(
        rows["reference"]["seconds"] / rows["quantized"]["seconds"]
    )
    assert "s/call" in _table(capsys.readouterr().out)["quantized"]


def test_console_script_inspects(folders):
    _, quantized = folders
    exe = shutil.which("qcompile")
    assert exe, "the qcompile console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "inspect", str(quantized), "--json"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["recipe"] == "int8-w8a8"


def test_quantize_warns_before_loading_a_denoiser_that_may_not_fit(folders, caplog, monkeypatch):
    import psutil

    from qcompile import commands

    source, _ = folders
    with caplog.at_level("WARNING", logger="qcompile.commands"):
        commands.warn_if_too_large(str(source), "transformer", torch.float32, "cpu")
        assert not caplog.records  # the tiny transformer fits this machine
        free = psutil.virtual_memory()._replace(available=1 << 20)
        monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
        commands.warn_if_too_large(str(source), "transformer", torch.float32, "cpu")
    (record,) = caplog.records
    assert "float transformer whole needs about" in record.getMessage()
    assert "0.0 GiB is free on cpu: pass --low-memory" in record.getMessage()


def _console(args: list[str], cwd) -> subprocess.CompletedProcess:
    exe = shutil.which("qcompile")
    assert exe, "the qcompile console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)


def test_out_dot_in_a_project_folder_is_refused_and_nothing_is_lost(tmp_path, folders):
    """`--out .` swapped the working folder for the pipeline and deleted the user's
    files, then crashed; now it is refused before anything loads."""
    source, _ = folders
    project = tmp_path / "project"
    (project / "myproject").mkdir(parents=True)
    (project / "dataset.csv").write_text("a,b\n1,2\n")
    (project / "myproject" / "train.py").write_text("print('hi')\n")
    done = _console(["quantize", str(source), "--recipe", "int8-wo", "--out", ".", *RUN], project)
    assert done.returncode == 2, done.stderr
    assert "is the current folder" in done.stderr and "Traceback" not in done.stderr
    assert (project / "dataset.csv").read_text() == "a,b\n1,2\n"
    assert (project / "myproject" / "train.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging left


def test_quantize_dot_writes_beside_the_model_folder_with_phase_lines(tmp_path, folders):
    """`qcompile quantize .` wrote a hidden ./.-int8-wo; piped output had no progress;
    every command printed diffusers' torch_dtype FutureWarning."""
    source, _ = folders
    model = tmp_path / "flux-tiny"
    shutil.copytree(source, model)
    done = _console(["quantize", ".", "--recipe", "int8-wo", *RUN], model)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "flux-tiny-int8-wo"
    assert (out / "model_index.json").is_file() and not list(model.glob(".*int8-wo*"))
    assert "FutureWarning" not in done.stderr
    for line in (
        "qcompile: load and quantize ...",
        "qcompile: capturing FluxTransformer2DModel with torch.export ...",
        "qcompile: save done in",
    ):
        assert line in done.stderr, done.stderr
    readme = (out / "README.md").read_text()  # the folder says how to load it
    assert "import qcompile" in readme and "int8-wo" in readme


@pytest.mark.parametrize("where", ["source", "parent", "not-a-pipeline"])
def test_out_that_would_replace_data_is_refused(tmp_path, folders, capsys, where):
    source, _ = folders
    out = {"source": source, "parent": source.parent, "not-a-pipeline": tmp_path}[where]
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.name for p in source.iterdir())
    assert main(["quantize", str(source), "--recipe", "int8-wo", "--out", str(out), *RUN]) == 2
    assert "pass a new" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_quantize_over_an_earlier_pipeline_save_keeps_other_files(tmp_path, folders, capsys):
    source, quantized = folders
    out = tmp_path / "again"
    shutil.copytree(quantized, out)
    (out / "notes.txt").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "a.png").write_bytes(b"png")
    assert main(["quantize", str(source), "--recipe", "int8-wo", "--out", str(out), *RUN]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "samples" / "a.png").is_file()
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["recipe"]["name"] == "int8-wo"  # replaced


def test_inspect_reads_a_checkpoint_whose_program_is_missing(tmp_path, folders, capsys):
    """Loading captures a missing .pt2 again, so inspect reads the layers from the
    model's config instead of failing."""
    _, quantized = folders
    copy = tmp_path / "q"
    shutil.copytree(quantized, copy)
    (copy / "transformer" / "qcompile_program.pt2").unlink()
    assert main(["inspect", str(copy)]) == 0
    table = _table(capsys.readouterr().out)
    assert table["program"] == "missing: captured again from the model when it loads"
    assert table["linears quantized"] == "40 of 50"
    assert table["transformer_blocks.0.attn.to_q"].split()[:2] == ["-", "64x64"]


def test_a_misspelled_recipe_in_a_pipeline_config_is_named_with_a_suggestion(folders):
    """A recipe name the user wrote is not a damaged checkpoint: the load says which
    names exist, as the CLI does."""
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from qcompile.errors import RecipeError

    config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-w0"},
        components_to_quantize=["transformer"],
    )
    with pytest.raises(RecipeError, match="did you mean 'int8-wo'") as error:
        DiffusionPipeline.from_pretrained(folders[0], quantization_config=config)
    assert "config.json" not in str(error.value)
