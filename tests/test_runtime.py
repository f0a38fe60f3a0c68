"""The runtime's AR loop with the PyTorch backend against the eager reference pipeline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bitdance_rt.checkpoint import load_checkpoint, preset, random_model
from bitdance_rt.errors import ResourceError
from bitdance_rt.models.kv_cache import StaticKVCache
from bitdance_rt.pipeline import GenerationRequest, ReferencePipeline
from bitdance_rt.runtime import StageTimer, generate, plan_for
from bitdance_rt.runtime.backends import torch_backend
from bitdance_rt.runtime.backends.torch_backend import TorchBackend
from bitdance_rt.sampling import draw_block_noise, sample_block, sample_block_premodulated, time_grid
from bitdance_rt.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]


def identical_fraction(a, b):
    return (a == b).all(-1).float().mean().item()


@pytest.fixture(scope="module")
def tiny64_ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny64"), parallel_num=64, seed=2)


CASES = [  # (fixture, height, width, guidance, images)
    ("tiny_ckpt", 256, 896, 4.0, 1),
    ("tiny_ckpt", 256, 896, 1.0, 1),
    ("tiny16_ckpt", 256, 1024, 3.0, 2),
    ("tiny16_ckpt", 256, 1024, 1.0, 2),
    ("tiny64_ckpt", 512, 512, 7.5, 1),
    ("tiny64_ckpt", 512, 512, 1.0, 2),
]


@pytest.mark.parametrize("fixture,height,width,guidance,images", CASES)
def test_torch_backend_equals_reference(request, fixture, height, width, guidance, images):
    model = load_checkpoint(request.getfixturevalue(fixture))
    req = GenerationRequest("a small boat", height, width, steps=3, guidance=guidance, seed=21,
                            num_images=images)
    ref = ReferencePipeline(model).generate(req)
    ours = generate(TorchBackend(model), plan_for(model, req), req.seed)
    assert ours.shape == ref.shape
    assert identical_fraction(ours, ref) >= 0.999


def test_plugin_op_and_plain_attention_agree(tiny16_ckpt):
    model = load_checkpoint(tiny16_ckpt)
    req = GenerationRequest("plugin", 256, 1024, steps=2, guidance=5.0, seed=3)
    plan = plan_for(model, req)
    a = generate(TorchBackend(model, use_plugin=True), plan, req.seed)
    b = generate(TorchBackend(model, use_plugin=False), plan, req.seed)
    assert identical_fraction(a, b) >= 0.999


def _cxx_compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_head_gives_the_same_image(tiny_ckpt):
    """``--compile`` (the head's x-dependent network through torch.compile) keeps the image."""
    torch._dynamo.reset()
    model = load_checkpoint(tiny_ckpt)
    req = GenerationRequest("compiled", 256, 896, steps=2, guidance=3.0, seed=8)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model), plan, req.seed)
    be = TorchBackend(model, compile=True)
    compiled = generate(be, plan, req.seed)
    assert be.denoise is not None
    assert identical_fraction(eager, compiled) >= 0.999


def test_one_llm_call_per_block_and_reuse(tiny16_ckpt):
    model = load_checkpoint(tiny16_ckpt)
    backend = TorchBackend(model)
    req = GenerationRequest("count", 256, 1024, steps=2, guidance=4.0, seed=1)
    plan = plan_for(model, req)
    timer = StageTimer("cpu")
    first = generate(backend, plan, req.seed, timer)
    blocks = 16 * 64 // 16
    assert timer.stats["block_step"].calls == blocks - 1  # none after the last block
    assert timer.stats["prefill"].calls == 3  # causal per prompt, then one batched block call
    assert timer.stats["head"].calls == blocks * 3
    ref_timer = StageTimer("cpu")
    ReferencePipeline(model).generate(req, timer=ref_timer)
    assert ref_timer.stats["block_step"].calls == 2 * blocks
    cache = backend.cache
    again = generate(backend, plan, req.seed)  # buffers reused, cache reset
    assert backend.cache is cache and torch.equal(first, again)


def test_cache_is_sized_up_front(tiny_ckpt):
    model = load_checkpoint(tiny_ckpt)
    backend = TorchBackend(model)
    req = GenerationRequest("sizes", 256, 896, steps=1, guidance=2.0, seed=1)
    plan = plan_for(model, req)
    backend.begin(plan)
    longest = max(len(s) for s in plan.seq_ids)
    assert backend.cache.max_len == longest + 16 * 56 - 4
    assert backend.cache.k.shape[1] == 2


def test_cache_too_big_is_refused(tiny_ckpt, monkeypatch):
    model = load_checkpoint(tiny_ckpt)
    monkeypatch.setattr(torch_backend, "available_memory", lambda device: 1000)
    req = GenerationRequest("huge", 256, 896, steps=1, guidance=2.0, seed=1, num_images=8)
    with pytest.raises(ResourceError, match="KV cache.*--num-images"):
        generate(TorchBackend(model), plan_for(model, req), req.seed)


def test_static_cache_overflow_is_caught():
    cache = StaticKVCache(1, 1, 1, 4, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="overflow"):
        cache.advance(5)


def test_rewound_cache_replays_the_block_step(tiny16_ckpt):
    """set_lens rewinds the static cache: the same block step on the same tokens gives the
    same head condition (what the benchmark's alternating growth replay relies on)."""
    model = load_checkpoint(tiny16_ckpt)
    be = TorchBackend(model)
    plan = plan_for(model, GenerationRequest("replay", 256, 1024, steps=1, guidance=3.0, seed=1))
    with torch.no_grad():
        be.begin(plan)
        be.prefill()
        before = list(be.cache.lens_host)
        tokens = torch.randint(0, 2, (1, 16, 32)).float() * 2 - 1
        first = be.block_step(tokens, 0)
        be.block_step(-tokens, 1)
        be.cache.set_lens(before)
        assert be.cache.lens.tolist() == before
        again = be.block_step(tokens, 0)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="cache lengths"):
        be.cache.set_lens([be.cache.max_len + 1] * len(before))


def test_premodulated_sampler_is_exact():
    model = random_model(preset("tiny"), seed=4)
    ts, dts = time_grid(6)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 128, generator=gen)
    torch.manual_seed(5)
    noise = draw_block_noise(1, 4, 32, 6, "cpu")
    with torch.no_grad():
        a = sample_block(model.head.net, cond, noise, 3.0, ts, dts)
        b = sample_block_premodulated(model.head.net, cond, noise, 3.0, ts, dts)
    assert torch.equal(a, b)


def test_cli_backends_agree(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from bitdance_rt.cli import rt_app

    outs = {}
    for backend in ("reference", "torch"):
        path = tmp_path / f"{backend}.png"
        r = CliRunner().invoke(rt_app, [
            "generate", "-c", str(tiny_ckpt), "-p", "cli", "--height", "256", "--width", "896",
            "--steps", "2", "--guidance", "3", "--device", "cpu", "--backend", backend,
            "--timings", "--no-progress", "--out", str(path)])
        assert r.exit_code == 0, r.output
        assert "block_step" in r.output and "total" in r.output
        import numpy as np
        from PIL import Image
        outs[backend] = torch.from_numpy(np.array(Image.open(path)))
    assert identical_fraction(outs["reference"], outs["torch"]) >= 0.999
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(tiny_ckpt), "-p", "x", "--height", "256",
                                    "--width", "896", "--device", "cpu", "--backend", "tensorflow"])
    assert r.exit_code == 2 and "unknown --backend" in r.output


def test_bench_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--preset", "tiny",
                        "--weights", "random", "--backends", "reference,torch", "--height", "256",
                        "--width", "896", "--steps", "2", "--warmup", "0", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"results", "config", "machine"}
    for name in ("reference", "torch"):
        res = data["results"][name]
        assert res["total_s"] > 0
        assert set(res["stages"]) == {"prefill", "block_step", "head", "decode"}
    assert data["results"]["torch"]["calls"]["block_step"] * 2 < \
        data["results"]["reference"]["calls"]["block_step"]
    assert "reference/torch" in r.stdout


# Ops that cannot sit inside a captured CUDA graph: a tensor made from host data (it becomes a
# host-to-device copy), and reads of a device value on the host (a synchronisation).
NOT_CAPTURABLE = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::_local_scalar_dense",
                  "aten::nonzero", "aten::masked_select"}


class CaptureLint(TorchDispatchMode):
    """Records every op that a CUDA graph capture would refuse."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in NOT_CAPTURABLE:
            self.bad.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _eager_capture(fn, problems):
    """Stands in for ``torch_backend._capture`` on the CPU: one warm-up run (as the real capture
    does), then every replay re-runs the body and copies its result into the static output.
    This checks the graph bodies' logic (static buffers, cache lengths advanced on the device,
    one capture serving every block and every image) and that they make no call a capture
    refuses (``CaptureLint``); the capture itself is checked on a GPU by
    test_cuda_graphs_match_eager."""
    from types import SimpleNamespace

    def body():
        with CaptureLint() as lint:
            result = fn()
        problems.extend(lint.bad)
        return result

    out = body()
    return SimpleNamespace(replay=lambda: out.copy_(body())), out


def _graph_bodies_backend(model, monkeypatch):
    """A torch backend on the CPU that takes its CUDA-graph code paths, with every capture
    replaced by ``_eager_capture``; returns it and the list the capture lint fills."""
    problems = []
    monkeypatch.setattr(torch_backend, "_capture", lambda fn: _eager_capture(fn, problems))
    be = TorchBackend(model, cuda_graphs=False)
    be.cuda_graphs = True  # the graph code paths, run eagerly on the CPU
    return be, problems


@pytest.mark.parametrize("guidance,images", [(4.0, 1), (1.0, 2)])
def test_graph_bodies_match_eager_on_cpu(tiny16_ckpt, monkeypatch, guidance, images):
    model = load_checkpoint(tiny16_ckpt)
    req = GenerationRequest("graph bodies", 256, 1024, steps=3, guidance=guidance, seed=4,
                            num_images=images)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    be, problems = _graph_bodies_backend(model, monkeypatch)
    first = generate(be, plan, req.seed)
    assert be._block_graph is not None and be._head_graphs
    second = generate(be, plan, req.seed)  # same plan: the captured bodies are reused
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert not problems, f"graph bodies call ops a CUDA graph capture refuses: {set(problems)}"


@pytest.mark.slow
def test_bf16_graph_bodies_match_reference_on_cpu(tiny16_ckpt, monkeypatch):
    """bfloat16, the default dtype on CUDA, through the eager path and the graph bodies on the
    CPU: the same image as the reference in bfloat16 (about 4 min: bf16 matmuls are slow here)."""
    model = load_checkpoint(tiny16_ckpt, dtype=torch.bfloat16)
    req = GenerationRequest("bf16", 256, 1024, steps=2, guidance=4.0, seed=4)
    plan = plan_for(model, req)
    ref = ReferencePipeline(model).generate(req)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    be, problems = _graph_bodies_backend(model, monkeypatch)
    graphs = generate(be, plan, req.seed)
    assert identical_fraction(ref, eager) >= 0.999
    assert identical_fraction(eager, graphs) >= 0.999
    assert not problems, f"graph bodies call ops a CUDA graph capture refuses: {set(problems)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_eager(tiny16_ckpt):
    model = load_checkpoint(tiny16_ckpt, device="cuda", dtype=torch.float32)
    req = GenerationRequest("graphs", 256, 1024, steps=3, guidance=4.0, seed=2)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    graphs = generate(TorchBackend(model, cuda_graphs=True), plan, req.seed)
    assert identical_fraction(eager, graphs) >= 0.99
