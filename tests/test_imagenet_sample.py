"""Sampling at scale into an .npz: chunks, seeds per chunk, shards, resuming, refusals.

These tests drive :func:`run_sample` with a small generator whose images are a pure function of
(labels, seed), so the run's bookkeeping is checked on its own; the end-to-end runs through a
tiny checkpoint (processes, the CLI) are in tests/test_imagenet.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitdance_rt.errors import BitDanceError
from bitdance_rt.imagenet.npz_run import (SampleRun, chunk_seed, parts_dir, run_sample,
                                          shard_from_env)


def make_generator(calls: list):
    def generate(labels, seed):
        calls.append((tuple(int(x) for x in labels), seed))
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = labels  # the label is visible in the image
        return images
    return generate


RUN = SampleRun(num=23, per_class=3, num_classes=10, batch=4, seed=7, steps=2, guidance=1.5,
                model="abc")


def test_one_process(tmp_path):
    calls = []
    out = tmp_path / "s.npz"
    assert run_sample(out, RUN, make_generator(calls)) == "done"
    with np.load(out) as z:
        images, labels = z["arr_0"], z["labels"]
    assert images.shape == (23, 4, 4, 3) and images.dtype == np.uint8
    assert labels.tolist() == [c for c in range(8) for _ in range(3)][:23]
    assert images[:, 0, 0, 0].tolist() == labels.tolist()
    assert [len(c[0]) for c in calls] == [4, 4, 4, 4, 4, 3]
    assert len({c[1] for c in calls}) == 6
    assert not parts_dir(out).exists()
    # finished: not redone
    assert run_sample(out, RUN, make_generator(calls)) == "finished" and len(calls) == 6


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_give_the_same_file(tmp_path, world):
    one = tmp_path / "one.npz"
    run_sample(one, RUN, make_generator([]))
    out = tmp_path / f"w{world}.npz"
    states = [run_sample(out, RUN, make_generator([]), rank=r, world=world)
              for r in range(world)]
    assert states[:-1] == ["waiting"] * (world - 1) and states[-1] == "done"
    with np.load(one) as a, np.load(out) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_interrupted_run_resumes_without_redoing_chunks(tmp_path):
    out = tmp_path / "s.npz"
    calls = []
    gen = make_generator(calls)

    def stopping(labels, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return gen(labels, seed)

    with pytest.raises(KeyboardInterrupt):
        run_sample(out, RUN, stopping)
    assert not out.exists()
    chunks = sorted(p.name for p in parts_dir(out).glob("chunk_*.npz"))
    assert chunks == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    # a damaged chunk is made again; the others are kept
    (parts_dir(out) / "chunk_000001.npz").write_bytes(b"half a file")
    again = []
    assert run_sample(out, RUN, make_generator(again)) == "done"
    assert [c[1] for c in again] == [chunk_seed(RUN.seed, k) for k in (1, 3, 4, 5)]
    full = tmp_path / "full.npz"
    run_sample(full, RUN, make_generator([]))
    with np.load(full) as a, np.load(out) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_other_settings_and_other_files_are_refused(tmp_path):
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        run_sample(out, RUN, lambda labels, seed: (_ for _ in ()).throw(KeyboardInterrupt))
    other = SampleRun(**{**RUN.__dict__, "seed": 8})
    with pytest.raises(BitDanceError, match="other settings"):
        run_sample(out, other, make_generator([]))
    mine = tmp_path / "mine.npz"
    mine.write_bytes(b"the user's file")
    with pytest.raises(BitDanceError, match="not this run's output"):
        run_sample(mine, RUN, make_generator([]))
    assert mine.read_bytes() == b"the user's file"
    with pytest.raises(BitDanceError, match=".npz"):
        run_sample(tmp_path / "s.png", RUN, make_generator([]))
    with pytest.raises(BitDanceError, match="per-class"):
        SampleRun(num=31, per_class=3, num_classes=10, batch=4, seed=0, steps=1, guidance=1.0,
                  model="")
    assert json.loads((parts_dir(out) / "run.json").read_text())["seed"] == 7


def test_shards(monkeypatch):
    assert shard_from_env("2/3") == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shard_from_env(None) == (1, 4)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(BitDanceError):
            shard_from_env(bad)
    seeds = {chunk_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= x < 2**63 for x in seeds)


# -- end to end: the command, processes, an interrupted run -------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    from bitdance_rt.imagenet.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("inet") / "t16", parallel_num=16, seed=0)


def sample_cmd(ckpt, out, num, *extra):
    return [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "sample",
            "-c", str(ckpt), "--out", str(out), "--num", str(num), "--batch", "4", "--steps",
            "2", "--seed", "3", "--device", "cpu", "--no-progress", *extra]


def run_shards(ckpt, out, num, world):
    """``world`` processes at once, as torchrun starts them (RANK, WORLD_SIZE)."""
    procs = [subprocess.Popen(sample_cmd(ckpt, out, num), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world)})
             for r in range(world)]
    for p in procs:
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0, (o, e)
    with np.load(out) as z:
        return z["arr_0"]


@pytest.mark.parametrize("num,worlds", [pytest.param(10, (2,)),
                                        pytest.param(200, (2, 3), marks=pytest.mark.slow)])
def test_processes_give_the_same_npz(tiny_imagenet, tmp_path, num, worlds):
    """``worlds`` processes at once write the file one process writes (the default suite: 10
    images in 2 processes, 3 chunks, the last one short, the one-process file made here;
    -m slow: 200 images in 1, 2 and 3 processes)."""
    if num <= 10:
        from bitdance_rt.imagenet import checkpoint, sample

        model = checkpoint.load(tiny_imagenet)
        run = SampleRun(num=num, per_class=1, num_classes=1000, batch=4, seed=3, steps=2,
                        guidance=model.defaults["guidance"], model="")
        one = np.concatenate([sample.generate(model, run.chunk_labels(k).tolist(), 2,
                                              run.guidance, chunk_seed(3, k)).numpy()
                              for k in range(run.chunks)])
    else:
        one = run_shards(tiny_imagenet, tmp_path / "one.npz", num, 1)
    assert one.shape == (num, 128, 128, 3) and one.dtype == np.uint8
    for world in worlds:
        assert np.array_equal(run_shards(tiny_imagenet, tmp_path / f"w{world}.npz", num, world),
                              one), f"{world} processes"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".npz") == sorted(
        ([] if num <= 10 else ["one.npz"]) + [f"w{w}.npz" for w in worlds])
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npz"]  # no parts left


def test_ctrl_c_keeps_finished_chunks_and_a_rerun_continues(tiny_imagenet, tmp_path):
    out = tmp_path / "s.npz"
    parts = parts_dir(out)
    proc = subprocess.Popen(sample_cmd(tiny_imagenet, out, 12), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("chunk_*.npz"))) < 1:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    o, e = proc.communicate(timeout=120)
    assert proc.returncode == 130 and e.strip().splitlines()[-1] == "interrupted", (o, e)
    assert not out.exists()
    kept = len(list(parts.glob("chunk_*.npz")))
    assert 1 <= kept < 3 and not list(parts.glob(".*partial"))
    r = subprocess.run(sample_cmd(tiny_imagenet, out, 12), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    # the kept chunks are not made again
    assert f"made {12 - 4 * kept} in" in r.stdout and f"{4 * kept} kept" in r.stdout, r.stdout
    assert not parts.exists()
    # the same images as the chunks made in one go, here
    from bitdance_rt.imagenet import checkpoint, sample

    model = checkpoint.load(tiny_imagenet)
    run = SampleRun(num=12, per_class=1, num_classes=1000, batch=4, seed=3, steps=2,
                    guidance=model.defaults["guidance"], model="")
    fresh = np.concatenate([sample.generate(model, run.chunk_labels(k).tolist(), 2,
                                            run.guidance, chunk_seed(3, k)).numpy()
                            for k in range(run.chunks)])
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], fresh)
    # a finished run is not redone
    r = subprocess.run(sample_cmd(tiny_imagenet, out, 12), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "already complete" in r.stdout
