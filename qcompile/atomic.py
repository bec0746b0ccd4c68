"""Atomic replacement of a directory: a save either fully happens or leaves the old one.

Files are written into a sibling temporary directory; only when every file is complete
and fsynced does it take the target's place. Entries of an existing target that the
save does not own (a user's notes, another variant's weights) are hard-linked into the
new directory first, so they survive; the new directory gets the old one's permissions
(a fresh one: 0777 less the umask, as `mkdir` would give). On Linux the swap is one
`renameat2(RENAME_EXCHANGE)` call, atomic even when the target exists; elsewhere it is
two renames, and a crash between them leaves the previous checkpoint beside the target
as `<name>.qcompile-old-*` instead of at it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike, owns: Callable[[str], bool] = lambda name: True
) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `target` when the block succeeds.

    Top-level entries of an existing `target` for which `owns(name)` is False, and that
    the block did not write, are carried over into the new directory.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        # The swap would leave this process in the old folder, which is then deleted.
        raise QCompileError(
            f"cannot replace {target}: it is the current working directory or holds it; "
            "save into a subfolder (e.g. ./flux-int8) or change directory first"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.qcompile-tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            _carry_over(target, staging, owns)
        staging.chmod(_mode_of(target))
        _fsync_tree(staging)
        if target.exists():
            _replace_existing(staging, target)
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old contents
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry_over(target: Path, staging: Path, owns: Callable[[str], bool]) -> None:
    """Hard-link (same filesystem: no copy) what the save does not own into staging."""
    for entry in target.iterdir():
        if owns(entry.name) or (staging / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=os.link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), staging / entry.name)
        else:
            os.link(entry, staging / entry.name)


def _mode_of(target: Path) -> int:
    if target.exists():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _replace_existing(staging: Path, target: Path) -> None:
    if _exchange(staging, target):
        return
    backup = Path(tempfile.mkdtemp(prefix=f"{target.name}.qcompile-old-", dir=target.parent))
    backup.rmdir()
    os.rename(target, backup)
    os.rename(staging, target)
    os.rename(backup, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    logger.debug("renameat2 unavailable (errno %d); using two renames", ctypes.get_errno())
    return False


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync(root)


def _fsync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
