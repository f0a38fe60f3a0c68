"""The class-conditional family through the exporter: its graphs and manifest, `check` against
the runtime's PyTorch code, the same AR loop over ONNX Runtime (tokens and pixels against the
torch backend), engines built by TensorRT-RTX on the CPU, per-request seeds in one AR run, and
the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import EngineError
from bitdance_rt.export import imagenet as imagenet_export
from bitdance_rt.export.check import check_export
from bitdance_rt.imagenet import checkpoint, sample, tiny
from conftest import one_line_error


@pytest.fixture(scope="module")
def ckpt4(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("in4") / "ckpt", 4, 3)


@pytest.fixture(scope="module")
def export4(ckpt4, tmp_path_factory):
    out = tmp_path_factory.mktemp("in4x") / "export"
    r = CliRunner().invoke(export_app, ["--checkpoint", str(ckpt4), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_the_export_writes_the_familys_graphs_and_manifest(export4, ckpt4):
    m = json.loads((export4 / "manifest.json").read_text())
    assert m["family"] == "imagenet" and list(m["graphs"]) == list(imagenet_export.GRAPHS)
    spec = checkpoint.load(ckpt4, weights=False).spec
    assert m["config_hash"] == spec.config_hash() and m["dtype"] == "fp32"
    assert m["past_range"] == [spec.cls_token_num + 3, spec.max_len - 5]
    assert m["limits"]["max_batch"] == imagenet_export.DEFAULT_MAX_BATCH


@pytest.mark.parametrize("seed", [11])
def test_check_passes_on_every_graph(export4, seed):
    rows, used = check_export(export4, seed=seed)
    assert used == seed and {r.graph for r in rows} == set(imagenet_export.GRAPHS)
    assert all(r.passed for r in rows), [(r.graph, r.case, r.output, r.scaled_rel) for r in rows
                                         if not r.passed]


@pytest.mark.parametrize("seed", [5])
def test_onnxruntime_gives_the_torch_backends_images(export4, ckpt4, seed):
    """Several labels, CFG on and off: the same tokens, and >= 99.9% identical pixels."""
    rng = np.random.default_rng(seed)
    model = checkpoint.load(ckpt4)
    graphs = sample.steps_for(checkpoint.load(ckpt4, weights=False), "onnxruntime", export4)
    for guidance in (1.0, float(rng.uniform(1.5, 5.0))):
        labels = rng.integers(0, 10, 3).tolist()
        want = sample.generate_tokens(model, labels, 4, guidance, seed)
        got = sample.generate_tokens(model, labels, 4, guidance, seed, graphs)
        assert torch.equal(want, got), f"seed {seed}, guidance {guidance}, labels {labels}"
        a = sample.decode(model, want)
        b = sample.decode(model, got, graphs)
        same = (a == b).float().mean().item()
        assert same >= 0.999 and (a.int() - b.int()).abs().max() <= 1, (seed, guidance, same)


@pytest.mark.parametrize("seed", [6])
def test_requests_in_one_run_get_their_own_seeds(ckpt4, seed):
    """Requests merged into one AR run (each its own seed, labels and number of images) get
    exactly the images each gets alone, with guidance and without."""
    rng = np.random.default_rng(seed)
    model = checkpoint.load(ckpt4)
    for guidance in (1.0, 3.0):
        reqs = [(int(rng.integers(0, 2**31)), int(rng.integers(1, 3)), int(rng.integers(0, 10)))
                for _ in range(3)]
        labels = [lab for _, n, lab in reqs for _ in range(n)]
        merged = sample.generate(model, labels, 3, guidance, [(s, n) for s, n, _ in reqs])
        i = 0
        for s, n, lab in reqs:
            alone = sample.generate(model, [lab] * n, 3, guidance, s)
            assert torch.equal(merged[i:i + n], alone), (seed, guidance, s, n, lab)
            i += n


def test_generate_cli_runs_the_export(export4, ckpt4, tmp_path):
    args = ["generate", "-c", str(ckpt4), "--class", "7", "-n", "2", "--steps", "3",
            "--seed", "4", "--no-progress"]
    blocks = checkpoint.load(ckpt4, weights=False).spec.num_blocks
    for extra in (["--backend", "onnxruntime", "--export-dir", str(export4), "--out",
                   str(tmp_path / "o.png")], ["--out", str(tmp_path / "t.png")]):
        r = CliRunner().invoke(rt_app, args + extra + ["--timings"])
        assert r.exit_code == 0, r.output
        # the per-stage table: calls counted as they ran (a graph call, or a model call)
        calls = {line.split()[0]: int(line.split()[2]) for line in r.output.splitlines()
                 if line.split()[:1] in (["prefill"], ["block_step"], ["head"], ["decode"])}
        per_block = 3 + 1 + ("onnxruntime" in extra)  # N + 1 evaluations (+ head_prepare)
        assert calls == {"prefill": 1, "block_step": blocks - 1, "head": blocks * per_block,
                         "decode": 1}, (extra, r.output)
    from PIL import Image

    for i in range(2):
        a = np.asarray(Image.open(tmp_path / f"o_{i}.png"))
        b = np.asarray(Image.open(tmp_path / f"t_{i}.png"))
        assert (a == b).mean() >= 0.999


@pytest.fixture(scope="module")
def engines4(request, tmp_path_factory):
    """A copy of the export with engines built for it (TensorRT-RTX on a CPU machine; with
    BITDANCE_TRT=tensorrt on a GPU machine, engines for its GPU)."""
    from bitdance_rt import trt as trt_compat

    try:
        trt_compat.load()
    except Exception as e:  # noqa: BLE001 - the reason is printed
        pytest.skip(f"no TensorRT to build with: {e}")
    export4 = request.getfixturevalue("export4")  # only once engines can be built
    copy = tmp_path_factory.mktemp("in4e") / "export"
    shutil.copytree(export4, copy)
    r = CliRunner().invoke(export_app, ["build", str(copy)])
    assert r.exit_code == 0, r.output
    return copy


def test_engines_build_from_the_export(engines4):
    copy = engines4
    info = json.loads((copy / "engines" / "engines.json").read_text())
    assert set(info["engines"]) == set(imagenet_export.GRAPHS)
    past = info["engines"]["next_step"]["profile"]["past_keys"]
    m = json.loads((copy / "manifest.json").read_text())
    assert past["min"][3] == m["past_range"][0] and past["max"][3] == m["past_range"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's refusals (a GPU "
                    "machine runs the engines: test_tensorrt_runner_matches_torch_on_gpu)")
def test_tensorrt_runner_checks_the_engines_then_needs_a_gpu(engines4, ckpt4, tmp_path):
    """Every check before CUDA work runs on real engines: the family, the model they were
    exported from, the engine files; then the one line that a GPU is needed."""
    run = CliRunner().invoke
    base = ["generate", "-c", str(ckpt4), "--class", "1", "--steps", "2", "--no-progress",
            "--backend", "tensorrt", "--out", str(tmp_path / "r.png")]
    one_line_error(run(rt_app, base), "--export-dir")
    for where in (engines4, engines4 / "engines"):
        one_line_error(run(rt_app, base + ["--export-dir", str(where)]), "CUDA GPU")
        with pytest.raises(EngineError, match="CUDA GPU"):
            sample.steps_for(checkpoint.load(ckpt4, weights=False), "tensorrt", where)
    r = run(rt_app, ["sample", "-c", str(ckpt4), "--num", "2", "--out", str(tmp_path / "s.npz"),
                     "--backend", "tensorrt", "--export-dir", str(engines4), "--no-progress"])
    one_line_error(r, "CUDA GPU")
    other = tiny.make_tiny(tmp_path / "other", 4, 99)   # same shapes, other weights
    with pytest.raises(EngineError, match="other weights"):
        sample.steps_for(checkpoint.load(other, weights=False), "tensorrt", engines4)
    damaged = tmp_path / "damaged"
    shutil.copytree(engines4, damaged)
    info = json.loads((damaged / "engines" / "engines.json").read_text())
    f = damaged / "engines" / info["engines"]["next_step"]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="rebuild"):
        sample.steps_for(checkpoint.load(ckpt4, weights=False), "tensorrt", damaged)
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "s.npz").exists()


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the engines: needs a CUDA GPU "
                    "and a TensorRT that builds for it (BITDANCE_TRT=tensorrt on H100/H200)")
@pytest.mark.parametrize("seed", [4])
def test_tensorrt_runner_matches_torch_on_gpu(engines4, ckpt4, seed):
    """The family's engines (fp32) against the torch backend in float32 on the same GPU: the
    same tokens for most AR steps, >= 99% identical pixels."""
    from bitdance_rt import trt as trt_compat

    info = json.loads((engines4 / "engines" / "engines.json").read_text())
    if trt_compat.gpu_target() not in info["targets"]:
        pytest.skip(f"the engines were built for {info['targets']}, this GPU is "
                    f"{trt_compat.gpu_target()} (set BITDANCE_TRT=tensorrt)")
    model = checkpoint.load(ckpt4, device="cuda")
    engines = sample.steps_for(checkpoint.load(ckpt4, weights=False, device="cuda"),
                               "tensorrt", engines4)
    labels = [1, 5, 9]
    a = sample.generate(model, labels, 4, 3.0, seed)
    b = sample.generate(model, labels, 4, 3.0, seed, engines)
    assert (a == b).float().mean().item() >= 0.99, seed


def test_refusals(export4, ckpt4, tiny_ckpt, tmp_path):
    run = CliRunner().invoke
    # options of the text-to-image exporter that this family has no use for
    for extra in (["--max-seq", "100"], ["--attention", "native"], ["--num-layers", "1"]):
        r = run(export_app, ["--checkpoint", str(ckpt4), "--out", str(tmp_path / "x")] + extra)
        one_line_error(r, extra[0], "class-conditional")
    base = ["generate", "-c", str(ckpt4), "--class", "1", "--steps", "2", "--no-progress",
            "--out", str(tmp_path / "r.png")]
    one_line_error(run(rt_app, base + ["--backend", "onnxruntime"]), "--export-dir")
    one_line_error(run(rt_app, base + ["--export-dir", str(export4)]), "--backend onnxruntime")
    # another model's weights of the same shapes
    other = tiny.make_tiny(tmp_path / "other", 4, 99)
    one_line_error(run(rt_app, ["generate", "-c", str(other), "--class", "1", "--steps", "2",
                                "--backend", "onnxruntime", "--export-dir", str(export4),
                                "--out", str(tmp_path / "w.png")]), "other weights")
    # a checkpoint of another family or size
    with pytest.raises(EngineError, match="not such a checkpoint"):
        check_export(export4, tiny_ckpt)
    other1 = tiny.make_tiny(tmp_path / "other1", 1, 3)
    with pytest.raises(EngineError, match="another model"):
        sample.steps_for(checkpoint.load(other1, weights=False), "onnxruntime", export4)
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "w.png").exists()


@pytest.mark.parametrize("seed", [8])
def test_the_head_loop_and_step_graphs_give_the_eager_tokens(ckpt4, seed):
    """The torch runner's captured head loops and transformer steps (their CUDA-graph code
    path, run on the CPU through the graph stand-in, which also refuses what a capture cannot
    hold) give exactly the eager tokens, with the guidance schedule changing every AR step and
    several requests: the run that captures, a replaying run with other labels and seeds on
    the same cache, and a run of another batch size (a new cache and new graphs)."""
    rng = np.random.default_rng(seed)
    model = checkpoint.load(ckpt4)
    blocks = model.spec.num_blocks
    for guidance in (1.0, float(rng.uniform(1.5, 5.0))):
        runner = sample.TorchSteps(model, emulate_graphs=True)
        for n in (3, 3, 2):
            labels = rng.integers(0, 10, n).tolist()
            seeds = [(int(rng.integers(0, 2**31)), n - 1), (int(rng.integers(0, 2**31)), 1)]
            want = sample.generate_tokens(model, labels, 3, guidance, seeds)
            got = sample.generate_tokens(model, labels, 3, guidance, seeds, runner)
            assert torch.equal(want, got), f"seed {seed}, guidance {guidance}, batch {n}"
            assert len(runner._steps) == blocks - 1  # one graph per transformer step k >= 1
        assert len(runner._loops) == 2 * (2 if guidance > 1 else 1)  # k = 0 samples both halves
