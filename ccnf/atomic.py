"""Atomic file output: write to a temporary sibling, then rename over the target.

An interrupted or failed stage therefore never leaves a half-written file behind: either the
old file (or nothing) is there, or the complete new one. The temporary is named
``.<target name>.<pid>.<random>.tmp``: a process killed outright (``kill -9``, power loss)
cannot remove its own, so the next write of the same target removes those whose process is
gone. A full disk (or a file-size limit) while writing is one :class:`CcnfError` naming the
target, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ccnf.errors import CcnfError

# errors that mean "the disk (or a quota, or a size limit) is full", whatever was being written
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class NoRoomError(CcnfError):
    """The disk, a quota or a file-size limit was full while an output was written."""

    def __init__(self, target: Path, reason: str) -> None:
        self.target, self.reason = target, reason
        super().__init__(
            f"no room to write {target}: {reason}; nothing was written",
            where=str(target),
            fix="free disk space (old DVC cache entries: dvc gc -w) or raise the quota / "
            "file-size limit, then re-run: dvc repro",
        )

    def __reduce__(self) -> tuple:
        return type(self), (self.target, self.reason)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that no longer exist."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    for name in glob.glob(glob.escape(str(target.parent / prefix)) + "*.tmp"):
        pid = Path(name).name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(Path(name))
            removed.append(Path(name))
    return removed


def _fsync_tree(path: Path) -> None:
    """fsync every regular file under ``path`` (or ``path`` itself), then the directories."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    Works for files and directories. On an exception the temporary is removed and the target
    is left untouched; a full disk becomes a :class:`CcnfError` naming the target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        _fsync_tree(tmp)  # the bytes reach the disk before the name does (power loss)
        if target.is_dir() and not target.is_symlink():
            # move the old directory aside in one rename, never delete it in place: a crash
            # then leaves the old tree, no tree, or the new one, never a half-deleted one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.",
                                        suffix=".tmp", dir=target.parent))
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, NoRoomError):  # from a file inside this output: name the output
            raise NoRoomError(target, err.reason) from None
        if isinstance(err, OSError) and err.errno in _FULL:
            raise NoRoomError(target, os.strerror(err.errno)) from None
        raise


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")
