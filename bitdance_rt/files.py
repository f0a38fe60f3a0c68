"""Files and directories written safely: every output goes to a temporary name in its own
directory and is renamed into place only when complete, and a directory of outputs is built
in a staging directory that replaces the old one in one step. An interrupted run leaves either
the old result or the new one, never a mix or a truncated file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BitDanceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(d: Path) -> None:
    """``d`` exists and is writable, or can be created (its nearest existing ancestor is a
    writable directory). Raises BitDanceError naming the reason."""
    d = Path(d)
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BitDanceError(f"{probe} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and full disks all show here
        fd, tmp = tempfile.mkstemp(prefix=".bitdance-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BitDanceError(f"{probe} is not writable ({e.strerror})") from None


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside ``path``; when the block completes it is renamed to
    ``path`` (replacing it), and on any error or interruption it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a file's usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_directory(final: Path):
    """Yields an empty staging directory beside ``final``; when the block completes the
    staging directory replaces ``final`` (the previous contents are removed only then), and
    on any error or interruption the staging directory is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    os.chmod(stage, 0o777 & ~_umask())
    old = None
    try:
        yield stage
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(stage, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)  # interrupted between the two renames: put it back
            old = None
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
