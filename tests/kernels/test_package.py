"""kernels/ installs as qcompile.kernels and must stay inert as a top-level `kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]


def test_repo_root_kernels_folder_does_not_shadow_hub_kernels():
    # From the repository root, `kernels/` is importable as `kernels`; transformers
    # imports that name while probing for Hugging Face's kernel hub package.
    script = (
        "import sys\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import diffusers.models\n"
        "print(is_kernels_available(), 'qcompile' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "False"]
