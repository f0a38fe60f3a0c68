"""Content hashes of the files bitdance-rt reads, verified once and remembered.

A directory's record (``VERIFIED`` inside it for bitdance-rt's own outputs; in the user's cache
for a checkpoint, :func:`verdict_record`) maps each file to its size, modification and change
times and inode when it was last verified, and what was found (its sha256, or a verdict such as
"every weight finite"): a file unchanged since is not read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .errors import BitDanceError, EngineError
from .files import inside, read_json

VERIFIED = ".bitdance-verified.json"  # the per-directory cache of verified hashes


def cache_dir() -> Path:
    """bitdance-rt's directory in the user's cache (``$XDG_CACHE_HOME/bitdance-rt``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitdance-rt"


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list:
    st = path.stat()
    # ctime too: a write that restores the modification time (touch -r) still changes it
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _read_verified(d: Path, record: Path | None = None) -> dict:
    try:
        return read_json(record or d / VERIFIED, "hash record")
    except BitDanceError:  # no record, or a damaged one: everything is hashed again
        return {}


def _write_verified(d: Path, known: dict, record: Path | None = None) -> None:
    path = record or d / VERIFIED
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def remember_hashes(d, hashes: dict) -> None:
    """Record that the files ``hashes`` names (relative to ``d``) have these contents now (a
    writer that just hashed what it wrote calls this, so the first reader need not rehash).
    A read-only directory simply keeps no record."""
    d = Path(d)
    known = _read_verified(d)
    for f, sha in hashes.items():
        with contextlib.suppress(OSError):
            known[f] = _stamp(d / f) + [sha]
    _write_verified(d, known)


def verdict_record(d) -> Path:
    """Where verdicts about the files of a directory that is not bitdance-rt's own (a
    checkpoint) are recorded: in the user's cache, not in the directory."""
    key = hashlib.sha256(str(Path(d).resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return cache_dir() / "verified" / f"{key[:24]}.json"


def recall_verdict(d, kind: str, name: str, record: Path | None = None):
    """What :func:`remember_verdict` recorded of file ``name`` of ``d`` under ``kind`` (for
    example which weights of a safetensors file were found finite), or None when the file
    changed since (its size, modification and change times or inode differ) or nothing was
    recorded. ``record``: the record file (default: the directory's own hash record)."""
    d = Path(d)
    rec = _read_verified(d, record).get(f"{kind}:{name}")
    try:
        stamp = _stamp(d / name)
    except OSError:
        return None
    if isinstance(rec, list) and len(rec) == len(stamp) + 1 and rec[:len(stamp)] == stamp:
        return rec[-1]
    return None


def remember_verdict(d, kind: str, verdicts: dict, record: Path | None = None) -> None:
    """Record ``verdicts`` (file name -> a JSON value) about files of ``d`` as they are now,
    under ``kind``; a file written since is judged again. A record that cannot be written is
    simply not kept."""
    d = Path(d)
    known = _read_verified(d, record)
    for name, value in verdicts.items():
        with contextlib.suppress(OSError):
            known[f"{kind}:{name}"] = _stamp(d / name) + [value]
    _write_verified(d, known, record)


def verify_hashes(d, hashes: dict, what: str, fix: str) -> None:
    """Each file of ``hashes`` (names inside ``d``: :func:`~bitdance_rt.files.inside`) has that
    sha256; a file whose size, modification and change times and inode are those recorded
    when it was last verified is not read again. Raises EngineError naming the first file that
    differs and ``fix``."""
    d = Path(d)
    known = _read_verified(d)
    fresh = {}
    for f, want in hashes.items():
        path = inside(d, f, what, error=EngineError, fix=fix)
        if not path.is_file():
            raise EngineError(f"{what} {path} is missing; {fix}")
        rec = known.get(f)
        stamp = _stamp(path)
        if isinstance(rec, list) and rec[:len(stamp)] == stamp and rec[len(stamp):] == [want]:
            continue
        have = sha256_file(path)
        if have != want:
            raise EngineError(f"{what} {path} has changed since it was written (its sha256 is "
                              f"{have[:16]}..., {want[:16]}... was recorded); {fix}")
        fresh[f] = have
    if fresh:
        remember_hashes(d, fresh)


