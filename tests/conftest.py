import json
import os
from pathlib import Path

# bitdance_rt sets the OpenMP and oneMKL settings it relies on when imported (OMP_WAIT_POLICY
# must be in place before torch starts its OpenMP runtime): import it before torch.
import bitdance_rt  # noqa: F401  isort: skip
import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. ``triton.jit`` reads
# TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test module
# is collected: no import order can leave a kernel compiled for a GPU this machine lacks.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitdance_rt.spec import RELEASED_SIZES  # noqa: E402
from bitdance_rt.tiny import make_tiny  # noqa: E402

# Sizes of a few blocks that the shared P = 4 checkpoint declares besides the released ones
# (its defaults stay the released model's), so that many configurations run in seconds.
SMALL_SIZES = ((64, 64), (64, 96), (96, 64), (128, 64), (96, 96))
# and the shared P = 16 checkpoint's (P = 16 blocks are 4 x 4 tokens: multiples of 64 pixels)
SMALL_SIZES_16 = ((64, 64), (128, 128), (128, 256), (256, 128))


def declare_sizes(path, small):
    """Let a tiny checkpoint take ``small`` sizes besides the released ones (its defaults stay
    the released model's)."""
    (path / "bitdance_rt.json").write_text(json.dumps(
        {"sizes": [list(s) for s in RELEASED_SIZES + small]}))
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A make-tiny checkpoint with P = 4 (seed 0), shared by the session: the released sizes
    and :data:`SMALL_SIZES`."""
    return declare_sizes(make_tiny(tmp_path_factory.mktemp("tiny4"), parallel_num=4, seed=0),
                         SMALL_SIZES)


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory):
    """The standard ONNX export of :func:`tiny_ckpt`, made once through the CLI and shared by
    the session: tests read it, and copy it before changing anything in it."""
    from typer.testing import CliRunner

    from bitdance_rt.cli import export_app
    from bitdance_rt.export import GRAPHS

    out = tmp_path_factory.mktemp("onnx4") / "export"
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in GRAPHS:  # one progress line per graph
        assert f"] {name}: {name}.onnx" in r.output
    return out


@pytest.fixture(scope="session")
def tiny16_ckpt(tmp_path_factory):
    """A make-tiny checkpoint with P = 16 (seed 1): the released sizes and
    :data:`SMALL_SIZES_16`."""
    return declare_sizes(make_tiny(tmp_path_factory.mktemp("tiny16"), parallel_num=16, seed=1),
                         SMALL_SIZES_16)


# The suite runs in two processes (pytest-xdist, ``-n 2 --dist loadgroup`` in pyproject.toml).
# Session (and module) fixtures are made once per process, so every test that needs a shared
# export (70 s to make) goes to the same one.
SHARED_GROUPS = {"tiny_export": "tiny-export",
                 "export4": "imagenet-export"}  # tests/test_imagenet_export.py's (50 s)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, group in SHARED_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))


# Random tests take their inputs from a parameter named ``seed`` (a fixed list of seeds:
# ``@pytest.mark.parametrize("seed", [0, 1, 2])``) and say it in their assertion messages; in
# case an assertion does not (torch.testing, a helper), a failing test with a ``seed`` parameter
# gets a report section naming it and the command that reruns exactly that case.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        seed = getattr(item, "funcargs", {}).get("seed")
        if seed is not None:
            report.sections.append(
                ("random seed", f"inputs drawn from seed {seed!r}; rerun this case with: "
                                f"python -m pytest '{item.nodeid}'"))


def one_line_error(r, *words):
    """A CLI result that failed the way user mistakes must: exit 2, one ``error:`` line
    holding every one of ``words``, no traceback; returns that line."""
    out = r.output.strip()
    assert r.exit_code == 2, out
    assert "Traceback" not in out, out
    err = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(err) == 1, out
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


def fake_export(d: Path) -> dict:
    """A directory with a manifest of the current format over small stand-in graph files."""
    from bitdance_rt.manifest import FORMAT, GRAPHS, MANIFEST, sha256_file

    d.mkdir(parents=True)
    graphs = {}
    for name in GRAPHS:
        f = f"{name}.onnx"
        (d / f).write_bytes(name.encode() * 10)
        graphs[name] = {"file": f, "files": {f: (d / f).stat().st_size},
                        "sha256": {f: sha256_file(d / f)},
                        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
                        "outputs": [], "dynamic_axes": {"x": {"0": "batch"}},
                        "external_data": False}
    manifest = {"format": FORMAT, "preset": "tiny-4x", "config_hash": "0" * 16,
                "dtype": "fp32", "parallel_num": 4, "attention": "standard",
                "limits": {"max_batch": 4, "max_rows": 8, "max_seq": 4608},
                "sizes": [[256, 896]], "default_size": [256, 896], "cache_slots": None,
                "source": {"checkpoint": "/nowhere"}, "graphs": graphs}
    (d / MANIFEST).write_text(json.dumps(manifest))
    return manifest
