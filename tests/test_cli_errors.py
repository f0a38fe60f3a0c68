"""Every mistake a user can make on the command line: one line on stderr, exit 2, nothing
half-written, and checked before the weights load (issue 11's cases, on a make-tiny checkpoint)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bitdance_rt.cli import export_app, rt_app
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--height", "256", "--width", "896", "--steps", "1", "--guidance", "2", "--device",
        "cpu", "--no-progress"]


def gen(ckpt, *args):
    return CliRunner().invoke(rt_app, ["generate", "-c", str(ckpt), "-p", "a boat", *FAST,
                                       *args])


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything reads the weights (the checks must come first)."""
    import bitdance_rt.checkpoint as ck

    def refuse(*a, **k):
        raise AssertionError("weights were read before the inputs were checked")

    monkeypatch.setattr(ck, "_load_tensors", refuse)


# -- outputs are checked before the work, and written atomically --------------------------------

def test_output_in_a_read_only_place(tiny_ckpt, tmp_path, no_weights):
    # /proc refuses new files even to root (a chmod 555 directory does not)
    one_line_error(gen(tiny_ckpt, "--out", "/proc/bitdance/x.png"), "not writable")


@pytest.mark.parametrize("name,hint", [("result", "result.png"), ("x.jpg", "x.png"),
                                       ("dir/", "bitdance.png")])
def test_output_name_must_be_a_png_file(tiny_ckpt, tmp_path, no_weights, name, hint):
    (tmp_path / "dir").mkdir()
    for n in ("1", "2"):  # the same answer for one image and for several
        one_line_error(gen(tiny_ckpt, "--out", str(tmp_path / name), "-n", n), hint)
    assert not list(tmp_path.glob("result*")) and not list(tmp_path.glob("x*"))


def test_png_is_written_atomically_and_readable(tiny_ckpt, tmp_path):
    r = gen(tiny_ckpt, "--out", str(tmp_path / "a.png"), "-n", "2")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_0.png", "a_1.png"]  # no leftovers
    img = Image.open(tmp_path / "a_1.png")
    assert img.text["prompt"] == "a boat" and img.text["image_index"] == "1"
    assert oct((tmp_path / "a_0.png").stat().st_mode & 0o777) != "0o600"


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_interrupted_save_leaves_no_truncated_image(tmp_path, monkeypatch, fail_at):
    """A set of images is saved all or nothing: an interrupt while writing any of them leaves
    neither a truncated image nor the ones written before it (nor their earlier versions
    changed)."""
    from bitdance_rt.runtime import images

    (tmp_path / "out_2.png").write_bytes(b"earlier")
    real, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == fail_at + 1:
            Path(fp).write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    paths = [tmp_path / f"out_{i}.png" for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        images.save_pngs(np.zeros((3, 4, 4, 3), np.uint8), paths, {})
    assert [p.name for p in tmp_path.iterdir()] == ["out_2.png"], fail_at
    assert (tmp_path / "out_2.png").read_bytes() == b"earlier"


def test_ctrl_c_prints_one_line_and_exits_130(tiny_ckpt, tmp_path):
    """A real process interrupted while it generates."""
    p = subprocess.Popen(
        [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "generate",
         "-c", str(tiny_ckpt), "-p", "x", "--height", "512", "--width", "512", "--steps", "40",
         "--device", "cpu", "--out", str(tmp_path / "x.png")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the first progress line
        line = p.stderr.readline()
        if "AR steps" in line:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# -- numbers, prompts and sizes: refused before any weights ---------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--guidance", "nan"], ["guidance"]),
    (["--guidance", "inf"], ["guidance"]),
    (["--guidance", "0.5"], ["guidance"]),
    (["--steps", "0"], ["steps"]),
    (["--seed", str(2**64)], ["seed"]),
    (["--seed", "-3"], ["seed"]),
    (["-n", "0"], ["images"]),
    (["--height", "500", "--width", "500"], ["500x500", "1024x1024"]),
    (["--device", "tpu"], ["--device"]),
    (["--device", "CPU"], ["--device"]),
    (["--dtype", "int4"], ["--dtype"]),
    (["--backend", "tensorflow"], ["unknown --backend"]),
    (["--backend", "onnxruntime"], ["--export-dir"]),
])
def test_bad_settings_are_one_line_before_loading(tiny_ckpt, tmp_path, no_weights, args, words):
    one_line_error(gen(tiny_ckpt, "--out", str(tmp_path / "x.png"), *args), *words)
    assert not list(tmp_path.iterdir())


def test_a_prompt_longer_than_the_context_is_refused(tiny_ckpt, tmp_path, no_weights):
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(tiny_ckpt), "-p", "word " * 9000,
                                    *FAST, "--out", str(tmp_path / "x.png")])
    one_line_error(r, "prompt", "8192", "shorten")


def test_empty_prompt_is_refused(tiny_ckpt, tmp_path, no_weights):
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(tiny_ckpt), "-p", "  ", *FAST,
                                    "--out", str(tmp_path / "x.png")])
    one_line_error(r, "-p", "is empty")  # the rule of every option (cli/app.check_values)


def test_float16_on_the_cpu_warns(tiny16_ckpt, tmp_path):
    # a copy that declares a 64x64 size: one block (bfloat16 runs slowly on the CPU)
    small = copy_ckpt(tiny16_ckpt, tmp_path / "small")
    (small / "bitdance_rt.json").write_text(json.dumps({"sizes": [[64, 64]]}))
    r = gen(small, "--out", str(tmp_path / "x.png"), "--dtype", "bfloat16", "--height", "64",
            "--width", "64")
    assert r.exit_code == 0, r.output
    assert "warning: --dtype bfloat16 on the CPU" in r.output


# -- damaged checkpoints ---------------------------------------------------------------------

def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights(tiny_ckpt, tmp_path):
    for name in ("model.safetensors", "ae.safetensors"):
        d = copy_ckpt(tiny_ckpt, tmp_path / name)
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        one_line_error(gen(d, "--out", str(tmp_path / "x.png")), name, "damaged")


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.pop("hidden_size"), ["config.json", "hidden_size"]),
    (lambda c: c.update(num_hidden_layers="two"), ["config.json"]),
])
def test_bad_config_json(tiny_ckpt, tmp_path, no_weights, edit, words):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(gen(d, "--out", str(tmp_path / "x.png")), *words)


def test_parallel_num_that_is_not_a_square(tiny_ckpt, tmp_path, no_weights):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "vision_head_config.json").read_text())
    cfg["parallel_num"] = 5
    (d / "vision_head_config.json").write_text(json.dumps(cfg))
    one_line_error(gen(d, "--out", str(tmp_path / "x.png")), "parallel_num 5")


# -- the CLI itself ---------------------------------------------------------------------------

def test_debug_anywhere_shows_the_traceback(tiny_ckpt, tmp_path):
    for where in ("before", "after"):
        args = ["generate", "-c", str(tmp_path / "missing"), "-p", "x", *FAST]
        args = (["--debug"] + args) if where == "before" else (args + ["--debug"])
        r = CliRunner().invoke(rt_app, args)
        assert r.exit_code != 0 and r.exception is not None
        assert "does not exist" in str(r.exception)


def test_flags_in_help_are_flags():
    out = CliRunner().invoke(rt_app, ["generate", "--help"]).output
    assert "--timings" in out and "<bool>" not in out


@pytest.mark.parametrize("args,words", [
    (["make-tiny", "{file}"], ["is a file"]),
    (["make-tiny", "{full}"], ["not empty"]),
    (["make-tiny", "/proc/bitdance-new"], ["not writable"]),
    (["make-tiny", "{new}", "--parallel-num", "5"], ["--parallel-num"]),
])
def test_make_tiny_errors(tmp_path, args, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fmt = dict(file=tmp_path / "file", full=tmp_path / "full", new=tmp_path / "new")
    r = CliRunner().invoke(export_app, [a.format(**fmt) for a in args])
    one_line_error(r, *words)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()


# -- the option parser's own errors: usage and exit 2, never "internal error" -------------------


@pytest.mark.parametrize("app, args, words", [
    (rt_app, ["generate", "-p", "x", "--steps", "abc"], "Invalid value for '--steps'"),
    (rt_app, ["generate", "-p", "x", "--guidance", "abc"], "Invalid value for '--guidance'"),
    (rt_app, ["generate", "-p", "x", "--foo"], "No such option: --foo"),
    (rt_app, ["generate", "-p", "x", "--steps"], "requires an argument"),
    (rt_app, ["generate"], "Missing option '--prompt'"),
    (rt_app, ["gen", "-p", "x"], "No such command 'gen'"),
    (rt_app, ["serve", "--port", "abc"], "Invalid value for '--port'"),
    (export_app, ["frobnicate"], "No such command 'frobnicate'"),
    (export_app, ["-c", "x", "--out", "y", "--max-batch", "abc"], "Invalid value"),
])
def test_parser_errors_show_usage_and_exit_2(app, args, words):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Error:" in r.output
    assert "internal error" not in r.output and "Traceback" not in r.output


def test_bf16_export_on_a_cpu_machine_warns_first(tmp_path):
    r = CliRunner().invoke(export_app, ["-c", str(tmp_path / "missing"), "--out",
                                        str(tmp_path / "e"), "--dtype", "bf16"])
    assert "warning: bf16 graphs are for TensorRT" in r.output
    one_line_error(r, "does not exist")


def test_engine_dir_is_an_alias_of_export_dir(tiny_ckpt, tmp_path, no_weights):
    """The old flag name still reaches the same check (users' scripts keep working)."""
    for flag in ("--export-dir", "--engine-dir"):
        r = gen(tiny_ckpt, "--out", str(tmp_path / "x.png"), "--backend", "torch", flag,
                str(tmp_path))
        one_line_error(r, "--export-dir is for --backend onnxruntime or tensorrt")
