"""Resolve ``qcompile.kernels`` and ``qcompile.passes`` in a source checkout.

pyproject's ``package-dir`` installs the repository's top-level ``kernels/`` and
``passes/`` folders as ``qcompile.kernels`` and ``qcompile.passes``. ``kernels/`` has no
``__init__.py`` on purpose: whenever the repository root is on ``sys.path`` (``python -c``
or ``python -m pytest`` run there, a test's subprocess) a regular package named
``kernels`` would shadow Hugging Face's ``kernels`` package, which transformers imports;
a folder without ``__init__.py`` is only a namespace portion, and the installed package
wins. setuptools' editable finder, and a ``qcompile`` imported straight from the
checkout, cannot map such a folder to a subpackage, so this finder does, for those two
names only, and only after every other finder has had its turn (a wheel install never
reaches it).
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"qcompile.kernels": "kernels", "qcompile.passes": "passes"}


class CheckoutFinder(MetaPathFinder):
    """Finds ``qcompile.<folder>`` as the checkout's top-level ``<folder>/``."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname not in FOLDERS:
            return None
        return PathFinder.find_spec(fullname, [str(ROOT)])


IN_CHECKOUT = (ROOT / "pyproject.toml").is_file() and (ROOT / "kernels" / "ops.py").is_file()
if IN_CHECKOUT and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(CheckoutFinder())
