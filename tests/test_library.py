"""The runtime as a library: per-request random numbers, batched requests, buffers reused, and
the captured-graph stand-in catching a tensor whose owner let it go."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime import generate, generate_tokens, plan_for
from bitdance_rt.runtime.backends.reference import ReferenceBackend
from bitdance_rt.runtime.backends.torch_backend import TorchBackend
from bitdance_rt.runtime.graphs import CaptureError, RecordedGraph
from bitdance_rt.runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]

# 128x256: 8 blocks of the P = 16 checkpoint (one of its small sizes, tests/conftest.py)
A = GenerationRequest("a small red boat on a calm lake at dawn", 128, 256, steps=2,
                      guidance=3.0, seed=11)
B = GenerationRequest("fox", 128, 256, steps=2, guidance=3.0, seed=12345, num_images=2)


def _alone_in_subprocesses(ckpt, reqs, tmp_path):
    """Generate each of ``reqs`` in a fresh process of its own (nothing else ever ran there),
    the processes at once; their arrays by seed."""
    procs = {}
    for req in reqs:
        out = tmp_path / f"{req.seed}.npy"
        code = (
            "import sys, numpy as np; from bitdance_rt.request import GenerationRequest; "
            "from bitdance_rt.runtime.session import Session; "
            f"r = GenerationRequest(**{req.__dict__!r}); "
            f"s = Session.open({str(ckpt)!r}, device='cpu'); "
            f"np.save({str(out)!r}, s.generate(r)[0].numpy())")
        procs[req.seed] = (subprocess.Popen([sys.executable, "-c", code], cwd=ROOT), out)
    for proc, _ in procs.values():
        assert proc.wait(timeout=300) == 0
    return {seed: np.load(out) for seed, (_, out) in procs.items()}


def test_requests_in_one_process_equal_separate_processes(tiny16_ckpt, tmp_path):
    """Two generations in one process (different prompts, prompt lengths, seeds and image
    counts), in either order, give the PNG data two separate processes give."""
    alone = _alone_in_subprocesses(tiny16_ckpt, (A, B), tmp_path)
    session = Session.open(tiny16_ckpt, device="cpu")
    for order in ((A, B), (B, A)):
        for r in order:
            assert np.array_equal(session.generate(r)[0].numpy(), alone[r.seed]), r.seed
    # the global generator is never touched
    torch.manual_seed(0)
    before = torch.get_rng_state()
    session.generate(A)
    assert torch.equal(torch.get_rng_state(), before)


def assert_same_image(backend: str, alone: torch.Tensor, batched: torch.Tensor) -> None:
    """The torch backend decodes image by image: bit for bit. The reference decodes a run's
    images in one call, as the authors' pipeline does, and the CPU's convolutions round by the
    batch they see: its pixels may differ by one level in a few places (its tokens are
    compared exactly where the tests can reach them)."""
    if backend == "torch":
        assert torch.equal(alone, batched)
        return
    diff = (alone.int() - batched.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() <= 1e-3


# the torch backend's batch invariance is swept in tests/test_sweep.py
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.slow), "reference"])
def test_batched_requests_equal_requests_alone(tiny16_ckpt, backend):
    """Two requests in one AR run (their own prompts, lengths and seeds in one batch) give the
    tokens each gives alone, bit for bit, and the same images (:func:`assert_same_image`)."""
    session = Session.open(tiny16_ckpt, device="cpu", backend=backend)
    be = session.backend
    together = generate_tokens(be, session.plan(A, B), [(A.seed, 1), (B.seed, 2)])
    assert torch.equal(together[:1], generate_tokens(be, session.plan(A), [(A.seed, 1)]))
    assert torch.equal(together[1:], generate_tokens(be, session.plan(B), [(B.seed, 2)]))
    alone = [session.generate(r)[0] for r in (A, B)]
    together = session.generate(A, B)
    assert [t.shape[0] for t in together] == [1, 2]
    for a, t in zip(alone, together):
        assert_same_image(backend, a, t)


def test_buffers_are_reused_when_large_enough(tiny16_ckpt):
    """After a large plan, a plan with fewer images and another prompt length reuses the KV
    cache and (graph code paths, CPU stand-in) every captured graph, and still gives the image
    it gives on a fresh backend."""
    model = load_checkpoint(tiny16_ckpt)
    be = TorchBackend(model, emulate_graphs=True)
    generate(be, plan_for(model, B), B.seed)
    storage = be.storage
    graphs = (dict(be._head_graphs), dict(be._block_graphs))
    small = generate(be, plan_for(model, A), A.seed)
    assert be.storage is storage
    assert (be._head_graphs, be._block_graphs) == graphs
    fresh = generate(TorchBackend(model, cuda_graphs=False), plan_for(model, A), A.seed)
    assert torch.equal(small, fresh)
    eager = TorchBackend(model, cuda_graphs=False)
    generate(eager, plan_for(model, B), B.seed)
    k = eager.storage.k
    generate(eager, plan_for(model, A), A.seed)
    assert eager.storage.k is k


def test_recorded_graph_refuses_a_tensor_its_owner_let_go():
    """The stand-in drops the body and its closure as a capture does: a body that reads a
    tensor only its closure held (the old BlockStepGraph's ``arange``) fails on replay, one that
    keeps it on its owner replays."""
    lens = torch.tensor([3, 5])

    def make(keep):
        arange = torch.arange(4)
        owner = type("Owner", (), {})()
        if keep:
            owner.arange = arange
        graph = RecordedGraph(lambda: lens[:, None] + arange)
        return owner, graph

    owner, graph = make(keep=True)
    lens.add_(1)
    graph.replay()
    assert graph.out.tolist() == [[4, 5, 6, 7], [6, 7, 8, 9]]
    _, graph = make(keep=False)
    with pytest.raises(CaptureError, match="no longer referenced"):
        graph.replay()


def test_recorded_graph_refuses_host_copies_and_syncs():
    x = torch.ones(3)
    with pytest.raises(CaptureError, match="refuses"):
        RecordedGraph(lambda: x + torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(CaptureError, match="refuses"):
        RecordedGraph(lambda: x * float(x.sum()))


def test_lm_head_is_checked_but_not_loaded(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from bitdance_rt.errors import CheckpointError

    model = load_checkpoint(tiny_ckpt)
    assert model.llm.lm_head is None
    assert not any("lm_head" in k for k in model.llm.state_dict())
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in Path(tiny_ckpt).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(bad)


def test_cpu_products_do_not_depend_on_the_batch(tiny_ckpt):
    """A row of a model's linear layer is the same bits alone, with one other row, with many,
    at any place among them and whatever the other rows hold (the shapes of the tiny, mid and
    14b LLM and head). The math library gives no such guarantee (oneMKL computes 1 to 3 rows
    with another kernel), so bitdance_rt.models.linear makes it by construction."""
    from bitdance_rt.models.linear import ROW_TILE, Linear, linear

    seed = 0
    gen = torch.Generator().manual_seed(seed)
    for k, n in ((128, 768), (256, 128), (512, 4096), (4096, 512), (5120, 128), (32, 256)):
        w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        x = torch.randn(300, k, generator=gen)
        full = linear(x, w, b)
        for m in (1, 2, 3, 5, 8, 16, 33, 64, ROW_TILE + 1):
            assert torch.equal(linear(x[:m], w, b), full[:m]), (seed, k, n, m)
        # other rows, elsewhere in the batch, with other leading dims
        shuffled = torch.randn(7, 11, k, generator=gen)
        shuffled[3, 5] = x[0]
        assert torch.equal(linear(shuffled, w, b)[3, 5], full[0]), (seed, k, n)
        assert torch.equal(linear(x[0], w, b), full[0]), (seed, k, n)  # a 1-D input
    # every linear layer of a model computes this way (none is a plain nn.Linear)
    model = load_checkpoint(tiny_ckpt)
    plain = [name for part in (model.llm, model.head, model.projector, model.ae)
             for name, m in part.named_modules()
             if isinstance(m, torch.nn.Linear) and not isinstance(m, Linear)]
    assert plain == []


def test_reference_is_a_backend_with_the_authors_extra_llm_call(tiny_ckpt):
    from bitdance_rt.runtime import StageTimer

    model = load_checkpoint(tiny_ckpt)
    plan = plan_for(model, GenerationRequest("x", 96, 96, steps=1, guidance=2.0, seed=1))
    timer = StageTimer("cpu")
    generate(ReferenceBackend(model), plan, 1, timer)
    blocks = 6 * 6 // 4
    assert timer.stats["block_step"].calls == 2 * blocks  # one call per prompt, after every block


def test_session_metadata_and_defaults(tiny_ckpt):
    session = Session.open(tiny_ckpt, device="cpu")
    meta = session.metadata(GenerationRequest("a cat"))
    assert (meta["height"], meta["width"], meta["steps"], meta["guidance"]) == (1024, 1024, 50, 7.5)
    # what a PNG's text chunks and the server's JSON carry: plain JSON values, nothing lost
    assert json.loads(json.dumps(meta)) == meta
    assert (meta["prompt"], meta["seed"], meta["backend"], meta["device"], meta["dtype"]) == (
        "a cat", 42, "torch", "cpu", "float32")


@pytest.mark.parametrize("backend,graphs", [("torch", False), ("torch", True),
                                            ("reference", False)])
def test_dropping_a_request_mid_run_keeps_the_others_exact(tiny16_ckpt, backend, graphs):
    """A request dropped after a few blocks (its client went away) stops being computed; the
    requests left in the run give, bit for bit, the images they give alone."""
    from bitdance_rt.runtime.backends.torch_backend import TorchBackend

    session = Session.open(tiny16_ckpt, device="cpu", backend=backend)
    if graphs:
        session.backend = TorchBackend(session.model, emulate_graphs=True)
    c = GenerationRequest("a third prompt, longer than the others", 128, 256, steps=2,
                          guidance=3.0, seed=77)
    alone = {r.seed: session.generate(r)[0] for r in (A, c)}
    seen = []

    def on_step(done, total):
        seen.append(done)
        return [1] if done == 3 else None  # drop B (two images) after block 3

    out = session.generate(A, B, c, on_step=on_step)
    assert out[1] is None
    assert_same_image(backend, alone[A.seed], out[0])
    assert_same_image(backend, alone[c.seed], out[2])
    assert seen == list(range(1, 8 * 16 // 16 + 1))  # every block reported
    if backend == "torch":
        rows = session.backend.cache.k.shape[1]
        assert rows == (8 if graphs else 4)  # graphs keep the captured batch of 4 images


def test_generate_plans_the_request_once(tiny16_ckpt, tmp_path, monkeypatch):
    """From `bitdance-rt generate` to the PNG, the prompt is tokenized once and the configs
    are read once: the plan made before the weights load is the one that runs."""
    from typer.testing import CliRunner

    import bitdance_rt.checkpoint as checkpoint
    from bitdance_rt.cli import rt_app

    prompt = "a lighthouse at dusk, counted"
    encoded, specs = [], []
    encode, read_spec = checkpoint.Tokenizer.encode, checkpoint.read_spec
    monkeypatch.setattr(checkpoint.Tokenizer, "encode",
                        lambda self, text: encoded.append(text) or encode(self, text))
    monkeypatch.setattr(checkpoint, "read_spec", lambda d: specs.append(d) or read_spec(d))
    out = tmp_path / "once.png"
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(tiny16_ckpt), "-p", prompt,
                                    "--height", "256", "--width", "896", "--steps", "1",
                                    "--device", "cpu", "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert sum(prompt in text for text in encoded) == 1, encoded
    assert len(specs) == 1, specs
