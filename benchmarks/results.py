"""Where benchmark results go: JSON with the run's versions, device, date and command."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_results(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` plus a "meta" block describing this run to `path`."""
    meta = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
    }
    Path(path).write_text(json.dumps({"meta": meta, **payload}, indent=2))
