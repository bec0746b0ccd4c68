"""The tables of a ``scripts/gpu.sh`` run, rendered from its JSONL (``--report``), and
where ``--write`` keeps them: benchmarks/results/ and docs/kernels.md."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(records: list[dict]) -> str:
    """The markdown tables of a run: environment, numerics, timings vs the baselines."""
    env = next((r for r in records if r["kind"] == "env"), {})
    lines = [
        f"Device: {env.get('device')} ({env.get('capability')}), driver {env.get('driver')}, "
        f"CUDA {env.get('cuda')}, torch {env.get('torch')}, Triton {env.get('triton')}, "
        f"Python {env.get('python')}; {env.get('date')}; `{env.get('command')}`"
        + (
            " — DRY RUN: CPU, interpreter, stand-in clock; not a measurement"
            if env.get("dry_run")
            else ""
        ),
        "",
    ]
    checks = [r for r in records if r["kind"] == "check"]
    failed = [r for r in checks if not r.get("ok")]
    lines.append(f"Numerics: {len(checks) - len(failed)}/{len(checks)} checks pass.")
    for r in failed:
        lines.append(f"- FAIL {r['name']}: {r.get('error') or r.get('sqnr_db')}")
    timings = [r for r in records if r["kind"] == "timing" and r.get("row") != "operands"]
    shapes = sorted({(r["k"], r["n"]) for r in timings})
    rows = list(dict.fromkeys(r["row"] for r in timings))
    for k, n in shapes:
        here = [r for r in timings if (r["k"], r["n"]) == (k, n)]
        ms = sorted({r["m"] for r in here}, reverse=True)
        lines += [
            "",
            f"K={k} N={n}: bf16 µs, then speed-up vs bf16 (×)",
            "",
            "| row | " + " | ".join(f"M={m}" for m in ms) + " |",
            "|---|" + "---:|" * len(ms),
        ]
        for row in rows:
            cells = []
            for m in ms:
                r = next((r for r in here if r["m"] == m and r["row"] == row), None)
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append("error")
                elif row == "bf16":
                    cells.append(f"{r['ms'] * 1e3:.1f} µs")
                else:
                    cells.append(f"{r['vs_bf16']:.2f}" if "vs_bf16" in r else "-")
            if any(cells):
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for r in records:
        if r["kind"] == "step" and r.get("skipped"):
            lines.append(f"\nSkipped {r['name']}: {r['skipped']}")
        if r["kind"] == "e2e":
            lines += _e2e_lines(r)
    errors = [r for r in timings if "error" in r]
    for r in errors[:20]:
        lines.append(f"- error {r['row']} M={r['m']} {r['k']}x{r['n']}: {r['error']}")
    return "\n".join(lines) + "\n"


def _e2e_lines(r: dict) -> list[str]:
    if not r.get("rows"):
        why = r.get("skipped") or r.get("error") or f"exit {r.get('returncode')}"
        return [f"\nEnd to end: no result ({why})"]
    lines = [
        f"\nEnd to end (`{r['command']}`, blocks {r['blocks'] or 'smoke'}):",
        "",
        "| row | ms | vs baseline | peak GiB | weights GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in r["rows"].items():
        if "ms" not in row:
            lines.append(f"| {name} | skipped: {row.get('skipped')} | | | |")
            continue
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
        lines.append(
            f"| {name} | {row['ms']:.2f} | {row['vs_baseline']:.2f} | {peak} | "
            f"{row['weight_gib']:.3f} |"
        )
    return lines


REPORT_START, REPORT_END = "<!-- gpu-report: start -->", "<!-- gpu-report: end -->"


def write_report(jsonl: Path, text: str, name: str) -> None:
    """The run's JSONL and tables into benchmarks/results/, the tables into docs/kernels.md
    between its gpu-report markers."""
    results = ROOT / "benchmarks" / "results"
    (results / f"{name}.jsonl").write_text(jsonl.read_text())
    (results / f"{name}.md").write_text(text)
    docs = ROOT / "docs" / "kernels.md"
    page = docs.read_text()
    if REPORT_START not in page or REPORT_END not in page:
        raise SystemExit(f"{docs} lacks the {REPORT_START} … {REPORT_END} markers")
    head, rest = page.split(REPORT_START, 1)
    tail = rest.split(REPORT_END, 1)[1]
    body = f"\n(benchmarks/results/{name}.md; `scripts/gpu.sh --report`)\n\n{text}\n"
    docs.write_text(head + REPORT_START + body + REPORT_END + tail)
