"""kernels/ installs as qcompile.kernels and never shadows Hugging Face's `kernels`.

The folder has no ``__init__.py``: from the repository root (``python -c``, ``python -m
pytest``, a test's subprocess) Python sees it only as a namespace portion, so the
installed ``kernels`` package wins. These tests run from the root with that package
installed (transformers depends on it; the lock file pins it).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]


def run_from_root(script: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_hub_kernels_package_is_installed():
    # Without it the shadowing tests below would prove nothing.
    assert importlib.metadata.version("kernels")


def test_repo_root_kernels_folder_does_not_shadow_hub_kernels():
    script = (
        "import sys, kernels\n"
        "from kernels import CUDAProperties, get_kernel\n"  # what transformers imports
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from diffusers import FluxPipeline, PixArtTransformer2DModel\n"
        "print(kernels.__file__, is_kernels_available(), 'qcompile' in sys.modules)\n"
    )
    kernels_file, available, qcompile_imported = run_from_root(script)
    assert Path(kernels_file).parent.parent.name == "site-packages"  # not REPO / "kernels"
    assert (available, qcompile_imported) == ("True", "False")


def test_qcompile_kernels_resolve_to_the_checkout_from_the_repo_root():
    script = (
        "import kernels, qcompile, torch\n"
        "from qcompile.kernels import ops, reference\n"
        "import qcompile.passes\n"
        "print(ops.__file__, qcompile.passes.__file__, kernels.__file__,\n"
        "      hasattr(torch.ops.qcompile, 'linear_w4a4'))\n"
    )
    ops_file, passes_file, kernels_file, registered = run_from_root(script)
    assert Path(ops_file) == REPO / "kernels" / "ops.py"
    assert Path(passes_file) == REPO / "passes" / "__init__.py"
    assert Path(kernels_file).parent.parent.name == "site-packages"
    assert registered == "True"


def test_python_m_benchmarks_runs_from_the_repo_root():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage" in done.stdout
