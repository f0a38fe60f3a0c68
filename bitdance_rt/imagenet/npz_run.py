"""Sampling at scale into the ADM evaluation suite's ``.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``).

A run is cut into chunks of ``batch`` images, in the authors' label order (class 0 ``per_class``
times, then class 1, ...). Chunk ``k`` is generated from its own seed, a pure function of the
run's seed and ``k`` (:func:`chunk_seed`), so the result does not depend on how many processes
share the work: process ``rank`` of ``world`` takes the chunks ``k % world == rank`` (``torchrun``
sets ``RANK`` and ``WORLD_SIZE``; ``--shard i/n`` does the same by hand, e.g. across machines on
a shared disk).

Each finished chunk is written atomically to ``OUT.parts/chunk_KKKKKK.npz`` beside the output,
with the run's settings in ``OUT.parts/run.json``: a rerun with the same settings skips the
chunks on disk, one with other settings is refused. The process that finds every chunk on disk
writes ``OUT`` (through a temporary file, then renamed) and removes the parts it wrote into; a
finished run is not redone.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BitDanceError
from ..files import atomic_path, check_room, parse_json, read_json

PARTS_SUFFIX = ".parts"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class SampleRun:
    """What a run makes; everything that changes its images is here (and in ``run.json``)."""

    num: int
    per_class: int
    num_classes: int
    batch: int
    seed: int
    steps: int
    guidance: float
    model: str  # the checkpoint's weights fingerprint

    def __post_init__(self):
        if self.num < 1 or self.batch < 1 or self.per_class < 1:
            raise BitDanceError("--num, --per-class and --batch must be at least 1")
        if self.num > self.per_class * self.num_classes:
            raise BitDanceError(
                f"--num {self.num} is more than --per-class {self.per_class} x "
                f"{self.num_classes} classes; raise --per-class or lower --num")

    @property
    def chunks(self) -> int:
        return -(-self.num // self.batch)

    def labels(self) -> np.ndarray:
        """The authors' order: every class ``per_class`` times, class by class."""
        return np.arange(self.num) // self.per_class  # image i: class i // per_class

    def chunk_labels(self, k: int) -> np.ndarray:
        return self.labels()[k * self.batch:(k + 1) * self.batch]


def chunk_seed(seed: int, k: int) -> int:
    """Chunk ``k``'s seed: independent streams per chunk, a pure function of (seed, k)."""
    state = np.random.SeedSequence([seed, k]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def shard_from_env(shard: str | None) -> tuple[int, int]:
    """``--shard i/n``, else torchrun's ``RANK``/``WORLD_SIZE``, else one process."""
    if shard:
        try:
            rank, world = (int(x) for x in shard.split("/"))
        except ValueError:
            raise BitDanceError(f"--shard {shard!r}: write it as I/N, e.g. 0/4") from None
    else:
        rank = int(os.environ.get("RANK", "0") or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 1 or not 0 <= rank < world:
        raise BitDanceError(f"shard {rank}/{world}: needs 0 <= I < N")
    return rank, world


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk_{k:06d}.npz"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:  # a unique temporary name: shards write side by side
        write(tmp)


def _save_npz(path: Path, **arrays) -> None:
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    _write_atomic(path, write)


def _read_chunk(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """A chunk on disk, or None when it is missing or not what this run would write."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, got = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(labels)
            or not np.array_equal(got, labels)):
        return None
    return images


def _check_run(parts: Path, run: SampleRun) -> None:
    """Record the run's settings, or refuse parts that another run wrote."""
    record = parts / RUN_FILE
    want = asdict(run)
    if record.is_file():
        try:
            have = read_json(record, "a sampling run's settings")
        except BitDanceError:
            have = None
        if have != want:
            raise BitDanceError(
                f"{parts} holds chunks of a run with other settings; finish that run with its "
                "settings, or remove the directory to start this one")
        return
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(record, lambda tmp: tmp.write_text(json.dumps(want, indent=1)))


def check_out(out) -> Path:
    """``--out`` names a .npz file that is not a directory (checked before any work)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise BitDanceError(f"--out {out}: name a .npz file (the evaluation suite reads .npz)")
    if out.is_dir():
        raise BitDanceError(f"--out {out} is a directory; name a .npz file")
    return out


def check_room_for(out, run: SampleRun, image_bytes: int) -> None:
    """Before the model loads: ``out`` and the chunks still to make fit on its file system
    (the chunks and the assembled file are both on disk before the chunks are removed)."""
    out = Path(out)
    parts = parts_dir(out)
    have = sum(f.stat().st_size for f in parts.glob("chunk_*.npz")) if parts.is_dir() else 0
    need = 2 * run.num * image_bytes + 4096 * (run.chunks + 1) - have
    check_room({out: max(need, 0)}, "--out")


def run_sample(out, run: SampleRun, generate: Callable[[np.ndarray, int], np.ndarray], *,
               rank: int = 0, world: int = 1,
               progress: Callable[[int, int, float], None] | None = None) -> str:
    """Make this process's chunks of ``run`` and, when every chunk is on disk, ``out``.

    ``generate(labels, seed)`` returns uint8 images ``[len(labels), H, W, 3]``. ``progress(done,
    total, seconds)`` hears of images done by this process. Returns ``"done"`` (``out``
    written now), ``"finished"`` (it was already there) or ``"waiting"`` (other shards still
    have chunks to make)."""
    out = check_out(out)
    parts = parts_dir(out)
    if out.is_file():
        if _finished_matches(out, run):
            _remove_parts(parts, run)  # left by a run stopped while it cleaned up
            return "finished"
        raise BitDanceError(f"{out} exists and is not this run's output; choose another --out")
    _check_run(parts, run)
    mine = [k for k in range(run.chunks) if k % world == rank]
    todo = [k for k in mine if _read_chunk(_chunk_path(parts, k), run.chunk_labels(k)) is None]
    total = sum(len(run.chunk_labels(k)) for k in todo)
    done, t0 = 0, time.perf_counter()
    if progress:
        progress(0, total, 0.0)
    for k in todo:
        labels = run.chunk_labels(k)
        images = np.asarray(generate(labels, chunk_seed(run.seed, k)))
        if images.dtype != np.uint8 or images.shape[0] != len(labels):
            raise RuntimeError(f"chunk {k}: the generator returned {images.shape} "
                               f"{images.dtype}, not {len(labels)} uint8 images")
        _save_npz(_chunk_path(parts, k), images=images, labels=labels)
        done += len(labels)
        if progress:
            progress(done, total, time.perf_counter() - t0)
    return _assemble(out, parts, run)


def _finished_matches(out: Path, run: SampleRun) -> bool:
    try:
        with np.load(out, allow_pickle=False) as z:
            meta = parse_json(str(z["run"]), str(out)) if "run" in z.files else None
    except (OSError, ValueError, BitDanceError, zipfile.BadZipFile, EOFError):
        return False
    return meta == asdict(run)


def _assemble(out: Path, parts: Path, run: SampleRun) -> str:
    chunks = []
    for k in range(run.chunks):
        images = _read_chunk(_chunk_path(parts, k), run.chunk_labels(k))
        if images is None:  # another shard's, still to come (or it just finished the run)
            return "finished" if _finished_matches(out, run) else "waiting"
        chunks.append(images)
    images = np.concatenate(chunks)
    _save_npz(out, arr_0=images, labels=run.labels(), run=np.array(json.dumps(asdict(run))))
    _remove_parts(parts, run)
    return "done"


def _remove_parts(parts: Path, run: SampleRun) -> None:
    """Remove the chunks and record this run wrote; anything else there stays."""
    for k in range(run.chunks):
        _chunk_path(parts, k).unlink(missing_ok=True)
    (parts / RUN_FILE).unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:  # missing, or something else is in there (not ours): leave it
        pass
