"""Outputs checked before the work, and signals at any moment.

Outputs: before any weights load, every command checks that its outputs can be put in place
(no directory where a file goes, no file where a directory must be made, names the file system
can hold with the temporary names they are first written under, room for all of them), and a
set of outputs is written all or nothing: a disk that fills up anyway leaves no new file and
one line naming the fix. Signals: Ctrl-C or SIGTERM at any moment gives one line and 128 + the
signal's number (130, 143), and leaves the old outputs or the new ones, never a part; a server
stopped while it loads its model exits cleanly. The cases are drawn from the seeds of a ``seed``
parameter (signal times, names, sizes, free space), named in every assertion message;
``tools/probe.py`` runs many more of them."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bitdance_rt import files, signals
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import BitDanceError
from bitdance_rt.runtime import images as images_mod
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""
    from bitdance_rt.runtime import session

    def refuse(*a, **k):
        raise AssertionError("the weights were loaded before the output was checked")

    monkeypatch.setattr(session.Session, "open", classmethod(refuse))


# -- outputs checked before the work -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_image_outputs_are_checked_before_the_weights_load(seed, tmp_path, monkeypatch,
                                                           no_weights):
    """Random names (some longer than the file system holds once the temporary suffix is
    added), random places (some under a file), random image counts and free space: the
    command refuses before the weights load exactly when one of the images could not be
    written, with one line naming the fix."""
    rng = random.Random(seed)
    nmax = os.pathconf(tmp_path, "PC_NAME_MAX")
    (tmp_path / "afile").write_text("x")
    bound = images_mod.png_size_bound(128, 128)  # the demo model's size
    for case in range(12):
        n = rng.choice([1, 2, 3, 8])
        stem_len = rng.choice([5, nmax - files.TEMP_NAME_EXTRA - 8, nmax - 12, nmax + 3])
        stem = "".join(rng.choice("abcxyz") for _ in range(stem_len))
        under_file = rng.random() < 0.25
        parent = tmp_path / ("afile" if under_file else f"d{case}") / "sub"
        out = parent / f"{stem}.png"
        free = rng.choice([10**12, n * bound + (2 << 20), n * bound // 2, 1000])
        monkeypatch.setattr(files, "free_bytes", lambda d, free=free: free)
        names = [p.name for p in images_mod.output_paths(out, n)]
        too_long = max(len(x.encode()) for x in names) + files.TEMP_NAME_EXTRA > nmax
        no_room = n * bound * 1.05 + files.SPACE_RESERVE > free
        monkeypatch.setattr(images_mod, "write_png",
                            lambda *a: pytest.fail("an image was written"))
        r = CliRunner().invoke(rt_app, ["generate", "-p", "a red circle", "-n", str(n),
                                        "--out", str(out), "--no-progress"])
        said = f"seed {seed} case {case}: n={n} name={stem_len} under_file={under_file} free={free}"
        if under_file:
            one_line_error(r, "is a file")
        elif too_long:
            one_line_error(r, "too long", "choose a shorter name")
        elif no_room:
            one_line_error(r, "not enough free space", "free some space")
        else:  # every check passed: the command went on to load the weights (refused here)
            assert "the weights were loaded" in r.output, (said, r.output)
        if not (under_file or too_long or no_room):
            continue
        assert not list(tmp_path.glob(f"d{case}/**/*.png")), said


@pytest.mark.parametrize("seed", SEEDS)
def test_outputs_named_with_dot_and_dot_dot(seed, tmp_path, monkeypatch):
    """Relative names with ``.`` and ``..`` anywhere (``--json ..``, ``a/../b.png``), from a
    directory a few levels down: each is checked as the path it reaches (a directory there is
    refused as a directory, a new name under an existing directory passes), never a Python
    error."""
    rng = random.Random(seed)
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for case in range(40):
        parts = [rng.choice([".", "..", "a", "b", "c", "new"]) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.5:
            parts.append("out.json")
        name = "/".join(parts)
        target = Path(os.path.abspath(name))
        said = f"seed {seed} case {case}: {name!r} -> {target}"
        try:
            files.check_room({Path(name): 100}, "--json")
        except BitDanceError as e:
            assert "\n" not in str(e), said
            assert target.is_dir() or not target.parent.exists() or "is a file" in str(e) \
                or target == Path(target.anchor), (said, str(e))
            if target.is_dir():
                assert "is a directory" in str(e), (said, str(e))
        else:
            assert not target.is_dir(), said


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_a_disk_that_fills_up_leaves_no_image_and_one_line(fail_at, tmp_path, monkeypatch):
    """The disk fills up while the third image of three is written (or the first, or the
    second) after the check passed: no image is left (nor a temporary file), the earlier
    versions of the files are untouched, and the error is one line naming the fix."""
    import torch

    from bitdance_rt.runtime.session import Session

    (tmp_path / "x_1.png").write_bytes(b"earlier")
    real, calls = images_mod.write_png, []
    # the images themselves do not matter here: three of the demo model's size, at once
    monkeypatch.setattr(Session, "generate", lambda self, plan, **k: [
        torch.zeros((plan.images, 128, 128, 3), dtype=torch.uint8)])

    def write(image, fp, meta):
        calls.append(fp)
        if len(calls) == fail_at + 1:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        real(image, fp, meta)

    monkeypatch.setattr(images_mod, "write_png", write)
    r = CliRunner().invoke(rt_app, ["generate", "-p", "a red circle", "-n", "3", "--out",
                                    str(tmp_path / "x.png"), "--no-progress"])
    one_line_error(r, "no space left", "free some space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_1.png"], fail_at
    assert (tmp_path / "x_1.png").read_bytes() == b"earlier"


def _tmpfs(path: Path, size: str):
    """Mount a small tmpfs at ``path`` (needs root); returns whether it worked."""
    if os.geteuid() != 0:
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk(tmp_path):
    """On a real 2 MB file system with 1.2 MB taken: three images that do not fit are refused
    before the work, and nothing is written."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("mount -t tmpfs failed (no CAP_SYS_ADMIN in this container)")
    try:
        (disk / "fill").write_bytes(b"\0" * 1_200_000)
        cmd = [sys.executable, "-c", "from bitdance_rt.entry import rt; rt()", "generate", "-p",
               "a red circle", "-n", "3", "--out", str(disk / "x.png"), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 2 and "not enough free space" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and sorted(os.listdir(disk)) == ["fill"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_directory_outputs_are_checked_before_the_work(tiny_ckpt, tmp_path, monkeypatch):
    """export, build, quantize, make-tiny, calibrate: no room, or a name too long for its
    staging name, is one line before any weights load (the export says when it loaded)."""
    monkeypatch.setattr(files, "free_bytes", lambda d: 5 << 20)  # less than the export
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out",
                                        str(tmp_path / "e")])
    one_line_error(r, "not enough free space", "MB")
    assert "loaded" not in r.output
    r = CliRunner().invoke(export_app, ["quantize", "--checkpoint", str(tiny_ckpt), "--out",
                                        str(tmp_path / "q"), "--recipe", "int8-weight"])
    one_line_error(r, "not enough free space")
    monkeypatch.setattr(files, "free_bytes", lambda d: 10**12)
    long = "e" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5)
    for args in (["--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / long)],
                 ["make-tiny", "--out", str(tmp_path / long)],
                 ["calibrate", "--checkpoint", str(tiny_ckpt), "--out",
                  str(tmp_path / (long + ".safetensors"))]):
        r = CliRunner().invoke(export_app, args)
        one_line_error(r, "too long")
    assert sorted(os.listdir(tmp_path)) == []


# -- signals --------------------------------------------------------------------------------


def test_the_signal_policy():
    """Inside ``handled``: SIGINT and SIGTERM raise Interrupted with 128 + the signal; one that
    arrives in a ``held`` section is raised when it ends; one whose exception was swallowed is
    raised again by ``check`` and stops an output's commit; the handlers before are put
    back."""
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with signals.handled():
            with pytest.raises(signals.Interrupted) as e:
                os.kill(os.getpid(), sig)
                time.sleep(1)
            assert e.value.exit_code == 128 + sig
            order = []
            with pytest.raises(signals.Interrupted):
                with signals.held():
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)
                    order.append("held section finished")
            assert order == ["held section finished"]
    assert signal.getsignal(signal.SIGTERM) is before and signals.received() is None
    with signals.handled():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed, as a finalizer or a native callback would
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        target = tmp / f"bitdance-signal-test-{os.getpid()}.txt"
        with pytest.raises(signals.Interrupted):
            with files.atomic_path(target) as t:
                t.write_text("x")
        assert not target.exists()
        assert not list(tmp.glob(f".{target.name}.*"))


def test_a_signal_in_a_finalizer_or_an_import_is_delivered_after_it():
    """A signal that arrives while a finalizer runs (where Python would drop the exception)
    or while a module is imported (where an extension's callback would abort the process)
    is delivered again right after it: raised in the code that follows, not lost."""
    log = []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs in here, inside the finalizer
            log.append("finalizer finished")

    with signals.handled():
        with pytest.raises(signals.Interrupted):
            obj = Finalized()
            del obj
            time.sleep(5)
            log.append("not interrupted")
    assert log == ["finalizer finished"]


def _gen_cmd(out, *extra):
    return [sys.executable, "-c", "from bitdance_rt.entry import rt; rt()", "generate", "-p",
            "a red circle on the left", "-n", "2", "--out", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_generate_stopped_at_random_times(seed, tmp_path):
    """SIGINT or SIGTERM at random times from the start of the process to its end (a fresh
    process each): either the two images are complete (the signal came after) or there is no
    file at all, one line, and 128 + the signal."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    r = subprocess.run(_gen_cmd(tmp_path / "full.png"), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    whole = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    for trial in range(2):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        delay, sig = rng.uniform(0, whole * 1.1), rng.choice([signal.SIGINT, signal.SIGTERM])
        p = subprocess.Popen(_gen_cmd(d / "x.png"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        got = sorted(os.listdir(d))
        said = f"seed {seed} trial {trial}: {sig.name} at {delay:.2f}s of {whole:.2f}s: " \
               f"rc {p.returncode}, {got}, {err[-400:]!r}"
        assert "Traceback" not in err, said
        if p.returncode == -sig:  # before the interpreter ran any code: nothing to clean up
            assert got == [] and not err.strip(), said
        elif p.returncode == 0:
            assert got == ["x_0.png", "x_1.png"], said
        else:
            assert p.returncode == 128 + sig and got == [], said
            assert err.strip().splitlines()[-1].startswith("interrupted"), said


def test_a_cancelled_engine_build_leaves_nothing(tiny_export, tmp_path):
    """A signal that came while TensorRT builds (its exception lost in native code) cancels
    the build at its next step: Interrupted, no engine directory, no staging left."""
    import shutil

    from bitdance_rt import trt as trt_compat
    from bitdance_rt.export.build import build_engines

    ok, why = trt_compat.available()
    if not ok:
        pytest.skip(f"needs TensorRT or TensorRT-RTX: {why}")
    d = tmp_path / "export"
    shutil.copytree(tiny_export, d, ignore=shutil.ignore_patterns("engines"))
    lines = []

    def progress(line):  # the first engine is done: now a signal arrives
        lines.append(line)
        if len(lines) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with signals.handled():
        with pytest.raises(signals.Interrupted):
            build_engines(d, progress=progress)
    assert len(lines) == 1, lines  # stopped in the second engine's build
    assert not (d / "engines").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".engines")]


def _serve_cmd(port):
    return [sys.executable, "-c", "from bitdance_rt.entry import rt; rt()", "serve", "--port",
            str(port), "--device", "cpu"]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_server_stopped_while_it_starts_or_loads(seed, tmp_path):
    """SIGTERM or SIGINT at random times while the server starts and loads its model: a clean
    exit (0 after SIGTERM's drain, or 128 + the signal before it serves; 130 for Ctrl-C), one
    last line, never an abort from a thread still loading."""
    from bitdance_rt.serve.client import free_port

    rng = random.Random(seed)
    for trial in range(3):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0, 4)
        p = subprocess.Popen(_serve_cmd(free_port()), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        time.sleep(delay)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
        said = f"seed {seed} trial {trial}: {sig.name} at {delay:.2f}s: rc {p.returncode}, " \
               f"{out[-600:]!r}"
        assert "Traceback" not in out and "terminate called" not in out, said
        ok = {signal.SIGINT: {130}, signal.SIGTERM: {0, 143}}[sig]
        if p.returncode == -sig:  # before the interpreter ran any code: nothing to clean up
            assert not out.strip(), said
        else:
            assert p.returncode in ok, said
