"""scripts/gpu.sh, the one GPU command, rehearsed on the CPU (``--dry-run``: Triton's
interpreter for the launchers, the references for the ops, tiny shapes, a stand-in
clock): every planned row is produced, the JSONL parses, the report renders; a failing
launch or step is recorded and the run goes on; a step that does not fit is skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not a package

from benchmarks import gpu  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[list[dict], str]:
    out = tmp_path_factory.mktemp("gpu")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return gpu.load(out / "gpu.jsonl"), done.stdout


def test_dry_run_produces_every_planned_row(dry_run):
    records, _ = dry_run
    env = records[0]
    assert env["kind"] == "env" and env["dry_run"] and env["interpreter"]
    assert {"torch", "triton", "python", "date", "command", "device"} <= set(env)
    planned = [s["name"] for s in next(r for r in records if r["kind"] == "plan")["steps"]]
    assert planned == ["numerics", *(f"gemm M={m}" for m in gpu.DRY_M), "e2e"]
    done = {r["name"]: r for r in records if r["kind"] == "step"}
    assert set(done) == set(planned)
    assert all("seconds" in r for r in done.values()), done
    checks = [r for r in records if r["kind"] == "check"]
    assert len(checks) >= 20 and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    kinds = {r["name"].split()[0] for r in checks}
    assert {"quantize_act_dynamic", "quantize_act_static", "quantize_act_4bit", "smooth",
            "linear_w8a8", "weight_only", "w4a4", "quantize_act_w4a8", "w4a8"} == kinds  # fmt: skip
    timings = {(r["m"], r["k"], r["n"], r["row"]): r for r in records if r["kind"] == "timing"}
    for m in gpu.DRY_M:
        for k, n in gpu.DRY_KN:
            for row in (*gpu.GEMM_ROWS, *gpu.ACT_ROWS):
                r = timings[m, k, n, row]
                assert r["ms"] > 0 and "error" not in r, r
                expected = timings[m, k, n, "bf16"]["ms"] / r["ms"]
                assert r["vs_bf16"] == pytest.approx(expected)
    # benchmarks/e2e.py --smoke --no-compile --ablations: every uncompiled row, each
    # graph row on the lowered graph for every call
    e2e = next(r for r in records if r["kind"] == "e2e")
    assert e2e["returncode"] == 0, e2e["tail"]
    rows, recipe = e2e["rows"], "int8-dynamic"
    graphs = {f"{recipe}+graph", f"{recipe}+graph-no-hfuse", f"{recipe}+graph-no-actfuse"}
    assert set(rows) == {"bf16"} | graphs and rows["bf16"]["vs_baseline"] == 1.0
    for name, row in rows.items():
        assert row["ms"] > 0 and len(row["ms_all"]) == 2 and row["weight_gib"] > 0
        if name in graphs:
            assert row["weight_gib"] < rows["bf16"]["weight_gib"]
            assert row["calls"].get("eager", 0) == 0 and row["calls"]["graph"] > 0


def test_report_renders_from_the_jsonl(dry_run, tmp_path):
    records, stdout = dry_run
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = gpu.report(gpu.load(path))
    checks = sum(r["kind"] == "check" for r in records)
    assert f"Numerics: {checks}/{checks} checks pass." in text
    assert "DRY RUN" in text and text in stdout  # the run printed the same tables last
    for k, n in gpu.DRY_KN:
        assert f"K={k} N={n}" in text
    assert "| svdq_w4a4 |" in text and "| act_nvfp4_svdq |" in text
    assert "End to end (" in text and "| int8-dynamic+graph | " in text


def test_a_failing_launch_is_recorded_and_the_run_goes_on(tmp_path):
    log = gpu.Log(tmp_path / "gpu.jsonl", dry_run=True)

    def clock(fn):
        if fn is failing:
            raise RuntimeError("out of resources: shared memory")
        return gpu.stand_in_clock(fn)

    rows = gpu.rows_for(gpu.operands(4, 64, 96, "cpu"), 4)
    failing = rows["int4_wo"]
    original = gpu.rows_for
    try:
        gpu.rows_for = lambda o, m: rows
        gpu.time_rows(4, [(64, 96)], [4], {}, clock, "cpu", log)
    finally:
        gpu.rows_for = original
    gpu.run_checks([("boom", lambda: 1 / 0), ("fine", lambda: {"ok": True})], log)
    records = gpu.load(log.path)
    failed = next(r for r in records if r.get("row") == "int4_wo")
    assert "out of resources" in failed["error"] and "ms" not in failed
    assert [r["row"] for r in records if r["kind"] == "timing"] == list(rows)
    boom, fine = (r for r in records if r["kind"] == "check")
    assert not boom["ok"] and "ZeroDivisionError" in boom["error"] and fine["ok"]


def test_steps_that_do_not_fit_are_skipped_and_a_failing_step_is_recorded(tmp_path):
    log = gpu.Log(tmp_path / "gpu.jsonl", dry_run=True)
    ran = []
    steps = [
        gpu.Step("fits", 1.0, lambda: ran.append("fits")),
        gpu.Step("raises", 1.0, lambda: [][0]),
        gpu.Step("too long", 500.0, lambda: ran.append("too long")),
        gpu.Step("after", 1.0, lambda: ran.append("after")),
    ]
    gpu.execute(steps, budget=100.0, log=log)
    assert ran == ["fits", "after"]
    records = {r["name"]: r for r in gpu.load(log.path)}
    assert "IndexError" in records["raises"]["error"]
    assert records["too long"]["skipped"].startswith("~500 s >")
