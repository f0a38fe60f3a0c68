"""The runtime's AR loop with the PyTorch backend against the eager reference pipeline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.errors import ResourceError
from bitdance_rt.models.kv_cache import StaticKVCache
from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime import StageTimer, generate, plan_for
from bitdance_rt.runtime.backends import torch_backend
from bitdance_rt.runtime.backends.reference import ReferenceBackend
from bitdance_rt.runtime.backends.torch_backend import TorchBackend
from bitdance_rt.runtime.timing import module_bytes
from bitdance_rt.sampling import NoiseSource, sample_block, sample_block_premodulated, step_schedule
from bitdance_rt.spec import preset
from bitdance_rt.tiny import make_tiny, random_model

ROOT = Path(__file__).resolve().parents[1]


def identical_fraction(a, b):
    return (a == b).all(-1).float().mean().item()


@pytest.fixture(scope="module")
def tiny64_ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny64"), parallel_num=64, seed=2)


# Released sizes (long sequences) at P = 4, 16, 64; tests/test_sweep.py covers many more
# configurations on small sizes (and these sizes in its wide run). The default suite runs
# P = 16 and 64 here, the others under -m slow.
CASES = [  # (fixture, height, width, guidance, images)
    pytest.param("tiny_ckpt", 256, 896, 4.0, 1, marks=pytest.mark.slow),
    pytest.param("tiny_ckpt", 256, 896, 1.0, 1, marks=pytest.mark.slow),
    ("tiny16_ckpt", 256, 1024, 3.0, 1),  # batches: tests/test_sweep.py, test_library.py
    pytest.param("tiny16_ckpt", 256, 1024, 3.0, 2, marks=pytest.mark.slow),
    pytest.param("tiny16_ckpt", 256, 1024, 1.0, 2, marks=pytest.mark.slow),
    ("tiny64_ckpt", 512, 512, 7.5, 1),
    pytest.param("tiny64_ckpt", 512, 512, 1.0, 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fixture,height,width,guidance,images", CASES)
def test_torch_backend_equals_reference(request, fixture, height, width, guidance, images):
    model = load_checkpoint(request.getfixturevalue(fixture))
    req = GenerationRequest("a small boat", height, width, steps=3, guidance=guidance, seed=21,
                            num_images=images)
    plan = plan_for(model, req)
    ref = generate(ReferenceBackend(model), plan, req.seed)
    ours = generate(TorchBackend(model), plan, req.seed)
    assert ours.shape == ref.shape
    if images == 1:  # the reference decodes a batch at once, the runtime image by image
        assert torch.equal(ours, ref)
    assert identical_fraction(ours, ref) >= 0.999


def test_plugin_op_and_plain_attention_agree(tiny16_ckpt):
    """The op (CPU: SDPA per group of equal cache lengths) against the plain-PyTorch form of
    the contract (one masked product over the whole cache, fp32): two independent
    computations of the same attention give the same image."""
    model = load_checkpoint(tiny16_ckpt)
    req = GenerationRequest("plugin", 128, 256, steps=2, guidance=5.0, seed=3)
    plan = plan_for(model, req)
    a, b = TorchBackend(model, use_plugin=True), TorchBackend(model, use_plugin=False)
    assert a.attention is not b.attention
    ia, ib = generate(a, plan, req.seed), generate(b, plan, req.seed)
    assert identical_fraction(ia, ib) >= 0.999


def _cxx_compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_head_gives_the_same_image(tiny_ckpt):
    """``--compile`` (the head's x-dependent network through torch.compile) keeps the image."""
    torch._dynamo.reset()
    model = load_checkpoint(tiny_ckpt)
    req = GenerationRequest("compiled", 96, 96, steps=2, guidance=3.0, seed=8)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model), plan, req.seed)
    be = TorchBackend(model, compile=True)
    compiled = generate(be, plan, req.seed)
    assert be.denoise is not None
    assert identical_fraction(eager, compiled) >= 0.999


def test_one_llm_call_per_block_and_reuse(tiny16_ckpt):
    model = load_checkpoint(tiny16_ckpt)
    backend = TorchBackend(model)
    req = GenerationRequest("count", 128, 256, steps=2, guidance=4.0, seed=1)
    plan = plan_for(model, req)
    timer = StageTimer("cpu")
    first = generate(backend, plan, req.seed, timer)
    blocks = 8 * 16 // 16
    # counted while running (forward hooks), not declared by the backend
    assert timer.stats["block_step"].calls == blocks - 1  # none after the last block
    assert timer.stats["prefill"].calls == 3  # causal per prompt, then one batched block call
    assert timer.stats["head"].calls == blocks * 3  # N + 1 evaluations per block
    assert timer.stats["decode"].calls == 1
    ref_timer = StageTimer("cpu")
    generate(ReferenceBackend(model), plan, req.seed, ref_timer)
    assert ref_timer.stats["block_step"].calls == 2 * blocks  # per prompt, and after the last
    assert ref_timer.stats["prefill"].calls == 4
    # the head's x-independent part is read once per block, the rest at every step; the
    # reference reads the whole head at every step
    net = model.head.net
    once = sum(module_bytes(m) for m in (net.cond_embed, net.time_embed, net.ada_ln_blocks,
                                          net.final_layer.ada_ln_modulation))
    assert timer.stats["head"].weight_bytes == blocks * (once + 3 * (module_bytes(net) - once))
    assert ref_timer.stats["head"].weight_bytes == blocks * 3 * module_bytes(net)
    layers = module_bytes(model.llm.model.layers) + module_bytes(model.llm.model.norm)
    assert timer.stats["block_step"].weight_bytes == (blocks - 1) * (
        layers + module_bytes(model.projector))
    cache = backend.cache
    again = generate(backend, plan, req.seed)  # buffers reused, cache reset
    assert backend.cache is cache and torch.equal(first, again)


def test_cache_is_sized_up_front(tiny_ckpt):
    model = load_checkpoint(tiny_ckpt)
    backend = TorchBackend(model)
    req = GenerationRequest("sizes", 256, 896, steps=1, guidance=2.0, seed=1)
    plan = plan_for(model, req)
    backend.begin(plan)
    assert max(len(s) for s in plan.row_ids()) <= 256
    assert backend.cache.max_len == 256 + 16 * 56 - 4  # prompts up to 256 tokens fit
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
    times, coeffs = step_schedule(6)
    gen = torch.Generator().manual_seed(0)
    for rows, batch, guidance in ((2, 1, 3.0), (1, 1, 1.0), (4, 2, 5.0)):
        cond = torch.randn(rows, 4, 128, generator=gen)
        noise = NoiseSource.from_seeds(5, "cpu").block(batch, 4, 32, 6, "cpu")
        with torch.no_grad():
            a = sample_block(model.head.net, cond, noise, guidance, times, coeffs)
            b = sample_block_premodulated(model.head.net, cond, noise, guidance, times, coeffs)
        assert torch.equal(a, b), (rows, guidance)


def test_cli_backends_agree(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from bitdance_rt.cli import rt_app

    outs = {}
    for backend in ("reference", "torch"):
        path = tmp_path / f"{backend}.png"
        r = CliRunner().invoke(rt_app, [
            "generate", "-c", str(tiny_ckpt), "-p", "cli", "--height", "96", "--width", "96",
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


def test_bench_json_shape(tiny_ckpt, tmp_path):
    """bench/latency.py on a checkpoint at one of its small sizes (6 blocks): its JSON."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--preset", "tiny",
                        "--weights", str(tiny_ckpt), "--backends", "reference,torch",
                        "--height", "64", "--width", "96", "--steps", "1", "--warmup", "0",
                        "--replay", "2",
                        "--json", str(out)],
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


# the sweep (tests/test_sweep.py) runs the graph code paths over many more configurations
@pytest.mark.parametrize("guidance,images", [(4.0, 1), pytest.param(1.0, 2, marks=pytest.mark.slow)])
def test_graph_bodies_match_eager_on_cpu(tiny16_ckpt, guidance, images):
    """The CUDA-graph code paths on the CPU, each capture replaced by its stand-in
    (``RecordedGraph``: records the body's ops, drops the body and its closure as a capture
    does, replays the ops, refuses ops a capture cannot hold): the same image as the eager
    path, and one capture serves a second run of the same plan."""
    model = load_checkpoint(tiny16_ckpt)
    req = GenerationRequest("graph bodies", 128, 256, steps=3, guidance=guidance, seed=4,
                            num_images=images)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    be = TorchBackend(model, emulate_graphs=True)
    first = generate(be, plan, req.seed)
    graphs = (dict(be._block_graphs), dict(be._head_graphs))
    assert graphs[0] and graphs[1]
    second = generate(be, plan, req.seed)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert (be._block_graphs, be._head_graphs) == graphs  # nothing captured again


@pytest.mark.slow
def test_bf16_graph_bodies_match_reference_on_cpu(tiny16_ckpt):
    """bfloat16, the default dtype on CUDA, through the eager path and the graph bodies on the
    CPU: the same image as the reference in bfloat16 (about 4 min: bf16 matmuls are slow here)."""
    model = load_checkpoint(tiny16_ckpt, dtype=torch.bfloat16)
    req = GenerationRequest("bf16", 256, 1024, steps=2, guidance=4.0, seed=4)
    plan = plan_for(model, req)
    ref = generate(ReferenceBackend(model), plan, req.seed)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    graphs = generate(TorchBackend(model, emulate_graphs=True), plan, req.seed)
    assert identical_fraction(ref, eager) >= 0.999
    assert identical_fraction(eager, graphs) >= 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_eager(tiny16_ckpt):
    model = load_checkpoint(tiny16_ckpt, device="cuda", dtype=torch.float32)
    req = GenerationRequest("graphs", 256, 1024, steps=3, guidance=4.0, seed=2)
    plan = plan_for(model, req)
    eager = generate(TorchBackend(model, cuda_graphs=False), plan, req.seed)
    graphs = generate(TorchBackend(model, cuda_graphs=True), plan, req.seed)
    assert identical_fraction(eager, graphs) >= 0.99
