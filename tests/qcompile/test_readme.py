"""Every code block of the README runs: the Python blocks in order as one script (as a
reader pastes them), the command-line block line by line through the console script.

A reader has no Hub here and no GPU, so the test swaps a few literals, each listed in
SWAPS and each required to occur in the README (an edit that drops one fails here, not
silently): the Hub id becomes a tiny offline Flux pipeline folder, the 1024² 28-step
call a 64² 2-step one, the calibration prompts the first two, the GPU memory budget
one that offloads every weight to disk. Everything else runs as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
HUB_ID = "black-forest-labs/FLUX.1-dev"
SWAPS = {
    HUB_ID: "./flux-dev",
    "num_inference_steps=28, height=1024, width=1024": "num_inference_steps=2, height=64, width=64",
    "prompts = qcompile.CALIBRATION_PROMPTS ": "prompts = qcompile.CALIBRATION_PROMPTS[:2] ",
    'max_memory={0: "10GiB", "cpu": "20GiB"}': 'max_memory={"cpu": 10_000}',
}
# Appended to each command line (argparse keeps the last value): small, CPU, float32.
CLI_RUN = ["--steps", "2", "--size", "64", "--dtype", "float32", "--device", "cpu"]
CLI_EXTRA = {
    "quantize": [*CLI_RUN, "--num-prompts", "2"],
    "eval": [*CLI_RUN, "--num-prompts", "1"],
    "bench": [*CLI_RUN, "--iters", "1"],
    "demo": ["--steps", "1", "--size", "32", "--out", "demo"],
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with what the README's blocks read: a tiny float Flux pipeline at
    ./flux-dev, a LoRA for it, a prompts file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from qcompile.tiny import tiny_flux, tiny_flux_pipeline

    root = tmp_path_factory.mktemp("readme")
    tiny_flux_pipeline().save_pretrained(root / "flux-dev")
    donor = tiny_flux()
    donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))
    lora = get_peft_model_state_dict(donor)
    save_file(
        {f"transformer.{k}": v.contiguous() for k, v in lora.items()},
        root / "my-flux-lora.safetensors",
    )
    (root / "prompts.txt").write_text("a cat on a windowsill\na red city at night\n")
    return root


def test_every_swap_names_text_the_readme_has():
    text = README.read_text()
    assert [old for old in SWAPS if old not in text] == []


def test_the_python_blocks_run_as_written(workdir):
    script = "\n\n".join(_blocks("python"))
    assert "import qcompile" in script and script.count("\n") > 40
    for old, new in SWAPS.items():
        script = script.replace(old, new)
    path = workdir / "readme_blocks.py"
    path.write_text(script)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(path)], cwd=workdir, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Counter({'graph': 2})" in result.stdout  # the call ran on the lowered graph
    assert (workdir / "flux-int8" / "transformer" / "qcompile_program.pt2").is_file()


def test_the_command_line_block_runs_line_by_line(workdir, monkeypatch):
    """In this process (the console script's own subprocess runs are tested in
    test_cli.py): the same parser and commands, without an interpreter start per line."""
    from qcompile_cli import main

    (block,) = [b for b in _blocks("bash") if "qcompile quantize" in b]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line]
    assert {args[1] for args in commands} == {*CLI_EXTRA, "inspect", "recipes"}
    monkeypatch.chdir(workdir)
    for args in commands:
        assert args[0] == "qcompile"
        assert main([*args[1:], *CLI_EXTRA.get(args[1], [])]) == 0, shlex.join(args)
