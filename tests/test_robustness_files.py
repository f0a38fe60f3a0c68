"""Nothing of the user's is deleted, and hashes cannot be walked around.

A command that writes a directory replaces only its own earlier output: a directory of other
files is refused, and every file an earlier run did not write (notes, engines built from an
export) is kept or, when the new output has the same name, refused before anything changes.
Every file a manifest, engines.json or a shard index names stays inside its directory (no
absolute paths, no ``..``, no symbolic links leading out), the file a graph loads is one of
its hashed files, and a calibration file carries a hash of its statistics that every reader
checks. The cases are generated from the seeds of a ``seed`` parameter, named in every
assertion message."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt.checkpoint import CheckpointError, _llm_files, weights_fingerprint
from bitdance_rt.cli import export_app
from bitdance_rt.errors import BitDanceError, EngineError
from bitdance_rt.files import inside, staged_directory
from bitdance_rt.manifest import (ENGINES, ENGINES_SUBDIR, FORMAT, GRAPHS, MANIFEST,
                                  check_engines, check_files, engine_file, engine_files,
                                  export_files, graph_file, read_engines, read_manifest,
                                  sha256_file)
from conftest import fake_export as export_dir

SEEDS = [0, 1, 2]


def snapshot(d: Path) -> dict:
    """Every entry under ``d``: file contents, link targets, directories."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def leftovers(parent: Path, keep: set) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# -- staged directories: the rule, on random trees ---------------------------------------------


def user_tree(rng, d: Path, taken: set) -> set:
    """Random entries of the user's in ``d`` (files, nested directories, symbolic links, hidden
    files) with names not in ``taken``; returns their top-level names."""
    names = set()
    for i in range(rng.randint(1, 5)):
        kind = rng.randrange(4)
        name = rng.choice(["notes", "README", ".hidden", "engines", "photos", "run"]) + str(i)
        if name in taken:
            continue
        names.add(name)
        p = d / name
        if kind == 0:
            p.write_bytes(rng.randbytes(rng.randint(0, 64)))
        elif kind == 1:
            sub = p
            for depth in range(rng.randint(1, 4)):
                sub = sub / f"level{depth}"
            sub.mkdir(parents=True)
            (sub / "deep.txt").write_text(f"mine {i}")
        elif kind == 2:
            p.symlink_to(d.parent / "elsewhere")
        else:
            p.mkdir()
    return names


@pytest.mark.parametrize("seed", SEEDS)
def test_replacing_an_output_keeps_every_file_it_did_not_write(seed, tmp_path):
    rng = random.Random(seed)
    (tmp_path / "elsewhere").write_text("outside")

    def owned(d, writes):
        return set(json.loads((d / "record.json").read_text())) | {"record.json"}

    for case in range(25):
        final = tmp_path / f"out{case}"
        final.mkdir()
        own = {f"g{i}.onnx" for i in range(rng.randint(1, 4))}
        for f in own:
            (final / f).write_bytes(b"old " + f.encode())
        (final / "record.json").write_text(json.dumps(sorted(own)))
        mine = user_tree(rng, final, own | {"record.json"})
        before = snapshot(final)
        new = {f"g{i}.onnx" for i in range(rng.randint(1, 4))}
        clash = rng.random() < 0.3 and bool(mine)
        if clash:
            new.add(rng.choice(sorted(mine)))
        try:
            with staged_directory(final, owned) as stage:
                for f in new:
                    (stage / f).write_bytes(b"new " + f.encode())
                (stage / "record.json").write_text(json.dumps(sorted(new)))
        except BitDanceError as e:
            assert clash, f"seed {seed} case {case}: {e}"
            assert "move" in str(e) and "\n" not in str(e), f"seed {seed} case {case}: {e}"
            assert snapshot(final) == before, f"seed {seed} case {case}"
            continue
        assert not clash, f"seed {seed} case {case}: {new & mine} was replaced"
        after = snapshot(final)
        for rel, content in before.items():  # the user's entries, exactly as they were
            if rel.split("/")[0] in mine:
                assert after.get(rel) == content, f"seed {seed} case {case}: {rel}"
        for f in new:
            assert after[f] == b"new " + f.encode(), f"seed {seed} case {case}"
        for f in own - new:
            assert f not in after, f"seed {seed} case {case}: stale {f}"
    assert leftovers(tmp_path, {f"out{c}" for c in range(25)} | {"elsewhere"}) == [], \
        f"seed {seed}"


@pytest.mark.parametrize("seed", SEEDS)
def test_an_interrupted_replacement_loses_nothing(seed, tmp_path, monkeypatch):
    """An error in the work, or in any rename of the swap (the user's files moved into the new
    directory one by one), leaves the earlier output and the user's files as they were."""
    rng = random.Random(seed)
    (tmp_path / "elsewhere").write_text("outside")
    real_rename, real_replace = os.rename, os.replace

    def owned(d, writes):
        return {"g.onnx"}

    for case in range(12):
        final = tmp_path / f"o{case}"
        final.mkdir()
        (final / "g.onnx").write_bytes(b"old")
        user_tree(rng, final, {"g.onnx"})
        before = snapshot(final)
        calls = {"n": 0}
        fail_at = rng.randint(0, 6)

        def flaky(src, dst, _real):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt
            return _real(src, dst)

        monkeypatch.setattr(os, "rename", lambda s, d: flaky(s, d, real_rename))
        monkeypatch.setattr(os, "replace", lambda s, d: flaky(s, d, real_replace))
        try:
            with staged_directory(final, owned) as stage:
                if fail_at == 0:
                    raise RuntimeError("the work failed")
                (stage / "g.onnx").write_bytes(b"new")
            done = True
        except (KeyboardInterrupt, RuntimeError):
            done = False
        finally:
            monkeypatch.setattr(os, "rename", real_rename)
            monkeypatch.setattr(os, "replace", real_replace)
        after = snapshot(final)
        if done:
            assert after == {**before, "g.onnx": b"new"}, f"seed {seed} case {case}"
        else:
            assert after == before, f"seed {seed} case {case}: failed at rename {fail_at}"
        assert leftovers(tmp_path, {f"o{c}" for c in range(12)} | {"elsewhere"}) == [], \
            f"seed {seed} case {case}"


def test_without_a_record_a_non_empty_directory_is_never_replaced(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("x")
    with pytest.raises(BitDanceError, match="not empty"):
        with staged_directory(d) as stage:
            (stage / "a").write_text("new")
    assert snapshot(d) == {"mine.txt": b"x"} and leftovers(tmp_path, {"d"}) == []


def test_a_staged_directory_gets_the_usual_modes(tmp_path):
    """Writers that make private files (safetensors, mkstemp) leave files others can read,
    as the umask says; executables stay executable."""
    old = os.umask(0o022)
    try:
        d = tmp_path / "out"
        with staged_directory(d) as stage:
            for name, mode in (("private", 0o600), ("tool", 0o700), ("odd", 0o640)):
                (stage / name).write_text(name)
                os.chmod(stage / name, mode)
            (stage / "sub").mkdir()
            (stage / "sub" / "deep").write_text("x")
            os.chmod(stage / "sub" / "deep", 0o600)
    finally:
        os.umask(old)
    modes = {p.relative_to(d).as_posix(): p.stat().st_mode & 0o777
             for p in d.rglob("*") if p.is_file()}
    assert modes == {"private": 0o644, "tool": 0o755, "odd": 0o644, "sub/deep": 0o644}


def test_make_tiny_weights_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(export_app, ["make-tiny", str(tmp_path / "t")])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "t").glob("*.safetensors")
            } == {n: 0o644 for n in ("ae.safetensors", "model.safetensors",
                                     "projector.safetensors", "vision_head.safetensors")}


# -- exports, engine directories, quantized checkpoints, calibration files ----------------------


def fake_export(d: Path, engines: bool = False) -> dict:
    """An export directory of the current format over small stand-in graph files (and, with
    ``engines``, an ``engines/`` as `build` writes it)."""
    manifest = export_dir(d)
    graphs = manifest["graphs"]
    if engines:
        e = d / ENGINES_SUBDIR
        e.mkdir()
        shutil.copy(d / MANIFEST, e / MANIFEST)
        entries = {}
        for name in GRAPHS:
            (e / f"{name}.engine").write_bytes(b"engine " + name.encode())
            entries[name] = {"file": f"{name}.engine", "bytes": (e / f"{name}.engine").stat()
                             .st_size, "sha256": sha256_file(e / f"{name}.engine")}
        info = {"format": 1, "flavor": "tensorrt_rtx", "version": "1", "targets": ["sm89"],
                "export": {"dir": "..", "manifest_sha256": sha256_file(d / MANIFEST),
                           "onnx_sha256": {f"{n}.onnx": graphs[n]["sha256"][f"{n}.onnx"]
                                           for n in GRAPHS}},
                "engines": entries}
        (e / ENGINES).write_text(json.dumps(info))
    return manifest


def reexport(d: Path, engines: bool = False):
    """What the exporter does to ``d``: a new export staged beside it, replacing it under
    :func:`export_files` (with ``engines``: as `--engines` does, engines/ included)."""
    from bitdance_rt.export.common import check_out_dir
    from bitdance_rt.export.exporter import export_writes

    check_out_dir(d, owned=export_files, writes=export_writes(engines))
    with staged_directory(d, export_files, "export") as stage:
        shutil.rmtree(stage)
        fake_export(stage, engines)
        for f in stage.glob("*.onnx"):
            f.write_bytes(b"re-exported")


def test_reexporting_keeps_the_users_files_and_built_engines(tmp_path):
    d = tmp_path / "e"
    fake_export(d, engines=True)
    (d / "notes.txt").write_text("my notes")
    (d / "benchmarks").mkdir()
    (d / "benchmarks" / "run1.json").write_text("{}")
    engines_before = snapshot(d / ENGINES_SUBDIR)
    reexport(d)  # a plain re-export: engines/ is not its output
    assert (d / "notes.txt").read_text() == "my notes"
    assert (d / "benchmarks" / "run1.json").exists()
    assert snapshot(d / ENGINES_SUBDIR) == engines_before  # kept (stale: the runtime says so)
    assert (d / "prefill.onnx").read_bytes() == b"re-exported"
    reexport(d, engines=True)  # --engines replaces engines that build wrote, and only those
    assert (d / "notes.txt").read_text() == "my notes"
    assert (d / ENGINES_SUBDIR / "prefill.engine").exists()
    # an engines/ with a file of the user's in it is not build's output: refused, untouched
    (d / ENGINES_SUBDIR / "my-profile.txt").write_text("mine")
    before = snapshot(d)
    with pytest.raises(BitDanceError, match="engines") as e:
        reexport(d, engines=True)
    assert "\n" not in str(e.value) and snapshot(d) == before
    assert leftovers(tmp_path, {"e"}) == []


def test_a_directory_that_is_not_an_output_is_refused_by_every_writer(tiny_ckpt, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"jpeg")
    for args in (["--checkpoint", str(tiny_ckpt), "--out", str(d)],
                 ["quantize", "-c", str(tiny_ckpt), "-r", "fp8-weight", "-o", str(d)],
                 ["build", str(tmp_path / "e"), "--out", str(d)]):
        if args[0] == "build":
            fake_export(tmp_path / "e")
        r = CliRunner().invoke(export_app, args)
        assert r.exit_code == 2 and "not empty" in r.output, (args, r.output)
        assert snapshot(d) == {"holiday.jpg": b"jpeg"}, args
    # a manifest that cannot be read does not make the directory an export
    (d / MANIFEST).write_text("[" * 1000)
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out", str(d)])
    assert r.exit_code == 2 and "manifest.json that cannot be read" in r.output, r.output
    assert (d / "holiday.jpg").read_bytes() == b"jpeg"


def test_engine_directories_keep_what_build_did_not_write(tmp_path):
    d = tmp_path / "e"
    fake_export(d, engines=True)
    e = d / ENGINES_SUBDIR
    (e / "notes.txt").write_text("mine")
    assert "notes.txt" not in engine_files(e)
    with staged_directory(e, engine_files, "engine directory") as stage:
        (stage / ENGINES).write_text((e / ENGINES).read_text())
        (stage / "prefill.engine").write_bytes(b"new")
    assert (e / "notes.txt").read_text() == "mine" and (e / "prefill.engine").read_bytes() == b"new"


def test_quantize_replaces_only_its_own_files(tiny_ckpt, tmp_path):
    from bitdance_rt.calibration.quantize import quantize_checkpoint
    from bitdance_rt.models.quant import LAYOUT_FILE

    q = tmp_path / "q"
    quantize_checkpoint(tiny_ckpt, "fp8-weight", q)
    layout = json.loads((q / LAYOUT_FILE).read_text())
    assert set(layout["files"]) == {p.name for p in q.iterdir()}
    (q / "notes.txt").write_text("how I made this")
    (q / "engines").mkdir()
    (q / "engines" / "x.engine").write_bytes(b"built")
    r = CliRunner().invoke(export_app, ["quantize", "-c", str(tiny_ckpt), "-r", "int8-weight",
                                        "-o", str(q)])
    assert r.exit_code == 0, r.output
    assert (q / "notes.txt").read_text() == "how I made this"
    assert (q / "engines" / "x.engine").read_bytes() == b"built"
    assert json.loads((q / LAYOUT_FILE).read_text())["recipe"] == "int8-weight"
    assert leftovers(tmp_path, {"q"}) == []


def test_calibrate_never_writes_over_a_file_of_the_users(tiny_ckpt, tmp_path, monkeypatch):
    import bitdance_rt.checkpoint as ck

    monkeypatch.setattr(ck, "_load_tensors", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("weights read before --out was checked")))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dir").mkdir()
    for out, words in (("notes.txt", "not a calibration file"), ("dir", "is a directory")):
        r = CliRunner().invoke(export_app, ["calibrate", "-c", str(tiny_ckpt), "-o",
                                            str(tmp_path / out), "--samples", "1", "--device",
                                            "cpu"])
        assert r.exit_code == 2 and words in r.output, r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- names confined to their directory -------------------------------------------------------------


REFUSALS = ("a file name inside the directory", "not a plain file name", "leads out of",
            "not one of its hashed files", "cannot be resolved")
BAD_NAMES = ["/etc/hostname", "../outside.onnx", "a/../../outside.onnx", "", ".", "..",
             "x\x00y", "sub\\..\\x", "./prefill.onnx", "a//b", "/", "x" * 300]


@pytest.mark.parametrize("seed", SEEDS)
def test_manifest_names_cannot_leave_the_directory(seed, tmp_path):
    rng = random.Random(seed)
    (tmp_path / "outside.onnx").write_bytes(b"prefill" * 10)  # same content as prefill.onnx
    base = tmp_path / "base"
    good = fake_export(base)
    for case in range(40):
        d = tmp_path / f"m{case}"
        shutil.copytree(base, d, symlinks=True)
        m = json.loads(json.dumps(good))
        g = m["graphs"][rng.choice(GRAPHS)]
        old = g["file"]
        bad = rng.choice(BAD_NAMES + ["link.onnx", "loop.onnx"])
        if bad == "link.onnx":  # a symbolic link leading out, listed with the right hash
            (d / bad).symlink_to(tmp_path / "outside.onnx")
        elif bad == "loop.onnx":
            (d / bad).symlink_to(d / bad)
        where = rng.randrange(3)
        if where == 0:  # the loaded file only (the hashed list unchanged)
            g["file"] = bad
        else:  # everywhere: the name, its size and its hash
            g["file"] = bad
            g["files"] = {bad: 70}
            g["sha256"] = {bad: sha256_file(tmp_path / "outside.onnx")}
        (d / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(EngineError) as e:
            m2 = read_manifest(d)
            check_files(m2, d)
            name = next(n for n, gr in m2["graphs"].items() if gr["file"] == bad)
            graph_file(m2, d, name)
        msg = str(e.value)
        assert "\n" not in msg, f"seed {seed} case {case}"
        assert any(w in msg for w in REFUSALS), f"seed {seed} case {case}: {bad!r}: {msg}"
        assert old != g["file"]
        shutil.rmtree(d)


def test_the_loaded_file_is_always_a_hashed_one(tmp_path):
    d = tmp_path / "e"
    m = fake_export(d)
    (d / "evil.onnx").write_bytes(b"other graph")
    m["graphs"]["block_step"]["file"] = "evil.onnx"  # hashed list left as it was
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="not one of its hashed files"):
        read_manifest(d)
    m["graphs"]["block_step"]["file"] = "block_step.onnx"
    m["graphs"]["block_step"]["sha256"] = {}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="records no content hash"):
        read_manifest(d)
    # a symbolic link inside the directory to a file inside it is followed (and hashed)
    fake_export(tmp_path / "f")
    f = tmp_path / "f"
    (f / "block_step.onnx").rename(f / "real.onnx")
    (f / "block_step.onnx").symlink_to("real.onnx")
    m = read_manifest(f)
    assert graph_file(m, f, "block_step") == f / "block_step.onnx"
    (f / "real.onnx").write_bytes(b"block_step" * 9 + b"X" * 10)  # same size, other content
    with pytest.raises(EngineError, match="has changed since it was written"):
        graph_file(m, f, "block_step")


@pytest.mark.parametrize("seed", SEEDS)
def test_engines_json_names_cannot_leave_the_directory(seed, tmp_path):
    rng = random.Random(seed)
    base = tmp_path / "base"
    fake_export(base, engines=True)
    (tmp_path / "outside.engine").write_bytes(b"engine prefill")
    for case in range(20):
        d = tmp_path / f"x{case}"
        shutil.copytree(base, d, symlinks=True)
        e = d / ENGINES_SUBDIR
        info = json.loads((e / ENGINES).read_text())
        bad = rng.choice(BAD_NAMES + ["link.engine"])
        if bad == "link.engine":
            (e / bad).symlink_to(tmp_path / "outside.engine")
        if rng.random() < 0.5:
            info["engines"]["prefill"]["file"] = bad
        else:
            info["export"]["onnx_sha256"] = {bad: "0" * 64}
        (e / ENGINES).write_text(json.dumps(info))
        with pytest.raises(EngineError) as err:
            i = read_engines(e)
            check_engines(i, e)
            engine_file(i, e, "prefill")
        assert "\n" not in str(err.value), f"seed {seed} case {case}"
        shutil.rmtree(d)
    i = read_engines(base / ENGINES_SUBDIR)  # the untouched one passes
    check_engines(i, base / ENGINES_SUBDIR)


@pytest.mark.parametrize("seed", SEEDS)
def test_shard_names_cannot_leave_the_checkpoint(seed, tmp_path):
    rng = random.Random(seed)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for case in range(15):
        d = tmp_path / f"c{case}"
        d.mkdir()
        bad = rng.choice(BAD_NAMES + ["link.safetensors"])
        if bad == "link.safetensors":
            (d / bad).symlink_to(tmp_path / "outside.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.norm.weight": bad}}))
        with pytest.raises(CheckpointError) as e:
            _llm_files(d)
        assert "\n" not in str(e.value), f"seed {seed} case {case}: {bad!r}"


def test_inside_accepts_plain_names_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.onnx").write_text("x")
    assert inside(tmp_path, "sub/a.onnx") == tmp_path / "sub" / "a.onnx"
    for bad in BAD_NAMES:
        with pytest.raises(BitDanceError):
            inside(tmp_path, bad)


# -- calibration files: hashed when written, verified when read, recorded when used --------------


@pytest.fixture(scope="module")
def calibration_file(tiny_ckpt, tmp_path_factory):
    from bitdance_rt.calibration.recipes import HEAD, LLM, quantized_names
    from bitdance_rt.calibration.stats import FORMAT as CAL_FORMAT, Calibration
    from bitdance_rt.checkpoint import read_spec
    from bitdance_rt.memory import meta_model

    spec = read_spec(tiny_ckpt)
    model = meta_model(spec, dtype=torch.float32)
    meta = {"format": CAL_FORMAT, "weights_fingerprint": weights_fingerprint(tiny_ckpt),
            "config_hash": spec.config_hash(), "prompts_sha256": "0" * 16, "samples": 1,
            "steps": 1, "height": 256, "width": 896, "guidance": 2.0, "seed": 0}
    calib = Calibration(meta)
    gen = torch.Generator().manual_seed(0)
    for comp, module in ((LLM, model.llm), (HEAD, model.head)):
        for name in quantized_names(comp, module):
            k = module.get_submodule(name).in_features
            ch = torch.rand(k, generator=gen) * 4 + 0.1
            calib.amax[f"{comp}/{name}"] = float(ch.max())
            calib.channel_max[f"{comp}/{name}"] = ch
    path = tmp_path_factory.mktemp("calib") / "c.safetensors"
    calib.save(path)
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_a_calibration_file_with_flipped_bits_is_refused(seed, calibration_file, tmp_path):
    from bitdance_rt.calibration.stats import Calibration

    rng = random.Random(seed)
    good = calibration_file.read_bytes()
    assert Calibration.load(calibration_file).sha256
    path = tmp_path / "c.safetensors"
    for case in range(60):
        data = bytearray(good)
        at = rng.randrange(len(data)) if rng.random() < 0.7 else rng.randrange(
            min(len(data), 8 + int.from_bytes(good[:8], "little")))  # the header half the time
        data[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        with pytest.raises(BitDanceError) as e:
            Calibration.load(path)
        assert "\n" not in str(e.value), f"seed {seed} case {case}"
        assert "calibrate" in str(e.value), f"seed {seed} case {case}: byte {at}: {e.value}"


def test_quantize_records_the_calibrations_hash(tiny_ckpt, calibration_file, tmp_path):
    from bitdance_rt.calibration.quantize import quantize_checkpoint
    from bitdance_rt.calibration.stats import Calibration

    want = Calibration.load(calibration_file).sha256
    layout = quantize_checkpoint(tiny_ckpt, "int8-sq", tmp_path / "q", calibration_file)
    assert layout["calibration"]["sha256"] == want
    data = bytearray(calibration_file.read_bytes())
    data[-3] ^= 0x10  # one bit of the last statistic
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    r = CliRunner().invoke(export_app, ["quantize", "-c", str(tiny_ckpt), "-r", "int8-sq",
                                        "--calibration", str(tmp_path / "flipped.safetensors"),
                                        "-o", str(tmp_path / "q2")])
    assert r.exit_code == 2 and "has changed since it was written" in r.output, r.output
    assert not (tmp_path / "q2").exists()
