"""Every CPU backend gives the reference's tokens, over many random configurations.

Each configuration is drawn from its own seed (printed in the test id and in every failure):
parallelism P, gan decoder or not, image size, sampler steps, guidance (on or off), one to three
requests with one to three images each, prompts from a few characters to about a thousand, and
request seeds over the whole 63-bit range. In float32 on the CPU the torch backend (eager and
through the graph code paths) must give exactly the reference's tokens, head outputs (float32,
before ``sign``) and images, and a request batched with others must give exactly
the tokens it gives alone. ONNX Runtime runs its own kernels on plain products, so it is held
to its documented parity instead (:func:`check_parity`: the same head outputs within float32
rounding, the same tokens up to a sign taken by a value within rounding of zero).

The default suite runs :data:`FAST` configurations for the torch backend, and :data:`FAST` for
ONNX Runtime on the session's shared P = 4 checkpoint and its export (an export takes about a
minute); ``-m slow`` runs :data:`WIDE` more, each through every backend, exporting each swept
checkpoint once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime.loop import generate, generate_tokens
from bitdance_rt.runtime.session import Session
from bitdance_rt.tiny import make_tiny

FAST = 20
WIDE = 240
# ONNX Runtime's documented parity (README, "Export"), see check_parity
ORT_ATOL = 1e-3

# Sizes a swept checkpoint declares: small ones (a few blocks) and one released size.
SIZES = {4: [(64, 64), (64, 96), (96, 64), (128, 64), (96, 96)],
         16: [(64, 64), (128, 64), (64, 128), (128, 128), (192, 128)],
         64: [(128, 128), (256, 128), (128, 256)]}
LONG_SIZES = {4: (256, 256), 16: (640, 384), 64: (512, 512)}

WORDS = ("a red circle square triangle on the left right at top bottom of white black blue "
         "green harbour lighthouse dusk, fox snow café 東京 — über naïve 1024 colours!").split()

_CKPTS: dict = {}
_SESSIONS: dict = {}
_EXPORTS: dict = {}


def _checkpoint(tmp_path_factory, p: int, gan: bool):
    key = (p, gan)
    if key not in _CKPTS:
        path = make_tiny(tmp_path_factory.mktemp(f"sweep{p}{'g' if gan else ''}"),
                         parallel_num=p, seed=p + gan, gan_decoder=gan)
        sizes = SIZES[p] + [LONG_SIZES[p]]
        (path / "bitdance_rt.json").write_text(json.dumps({
            "name": f"sweep-{p}", "sizes": [list(s) for s in sizes],
            "defaults": {"height": sizes[0][0], "width": sizes[0][1], "steps": 3,
                         "guidance": 4.0}}))
        _CKPTS[key] = path
    return _CKPTS[key]


def _export(tmp_path_factory, path) -> Path:
    """The standard ONNX export of a swept checkpoint, made once."""
    key = str(path)
    if key not in _EXPORTS:
        from bitdance_rt.export import export_checkpoint

        out = tmp_path_factory.mktemp(f"{path.name}_onnx") / "export"
        export_checkpoint(path, out)
        _EXPORTS[key] = out
    return _EXPORTS[key]


def _session(path, backend: str, variant: str = "", export: Path | None = None) -> Session:
    key = (str(path), backend, variant)
    if key not in _SESSIONS:
        session = Session.open(path, backend=backend, device="cpu", engine_dir=export)
        if variant:
            from bitdance_rt.runtime.backends.torch_backend import TorchBackend

            session.backend = TorchBackend(session.model, emulate_graphs=variant == "graphs")
        _SESSIONS[key] = session
    return _SESSIONS[key]


def _prompt(rng: random.Random) -> str:
    n = rng.choice([1, 2, 5, 12, 40, 170]) if rng.random() < 0.9 else 170
    return " ".join(rng.choice(WORDS) for _ in range(n))


def draw_config(seed: int, wide: bool, checkpoint: tuple | None = None) -> dict:
    """One configuration, a pure function of its seed (``checkpoint``: ``(p, gan)`` fixed)."""
    rng = random.Random(seed)
    p = rng.choice([4, 16, 16, 64])
    gan = rng.random() < 0.4
    if checkpoint is not None:
        p, gan = checkpoint
    size = LONG_SIZES[p] if wide and rng.random() < 0.04 else rng.choice(
        SIZES[p] if wide else SIZES[p][:3])
    steps = rng.randint(1, 6 if wide else 3)
    guidance = 1.0 if rng.random() < 0.3 else round(rng.uniform(1.05, 9.0), 3)
    reqs, images = [], 0
    for _ in range(rng.choice([1, 1, 2, 3])):
        n = rng.choice([1, 1, 2, 3])
        if images + n > 4:
            break
        images += n
        reqs.append(dict(prompt=_prompt(rng), seed=rng.randrange(2**63), num_images=n))
    return dict(p=p, gan=gan, height=size[0], width=size[1], steps=steps, guidance=guidance,
                requests=reqs)


def _requests(cfg: dict) -> list:
    return [GenerationRequest(r["prompt"], height=cfg["height"], width=cfg["width"],
                              steps=cfg["steps"], guidance=cfg["guidance"], seed=r["seed"],
                              num_images=r["num_images"]) for r in cfg["requests"]]


def _tokens(session: Session, reqs: list) -> torch.Tensor:
    """The tokens ``[B, h*w, 32]`` and, after them on the last axis, the head's output before
    ``sign`` (float32): equal bits there are a far stronger check than equal signs."""
    plan, be = session.plan(*reqs), session.backend
    xs = []
    sample = be.sample_head

    def recorded(cond, noise):
        x = sample(cond, noise)
        xs.append(x.clone())
        return x

    be.sample_head = recorded
    try:
        tokens = generate_tokens(be, plan, [(r.seed, r.num_images) for r in reqs])
    finally:
        del be.sample_head
    return torch.cat([tokens, torch.cat(xs, 1)], -1)


def _where(a: torch.Tensor, b: torch.Tensor) -> str:
    ch = a.shape[-1] // 2
    signs = (a[..., :ch] != b[..., :ch]).any(-1).nonzero()
    values = (a[..., ch:] != b[..., ch:]).any(-1).nonzero()
    if len(signs):
        image, token = signs[0].tolist()
        return f"first token difference: image {image}, token {token} ({len(signs)} differ)"
    if len(values):
        image, token = values[0].tolist()
        return (f"same tokens, but the head's output differs first at image {image}, token "
                f"{token} ({len(values)} differ)")
    return "identical"


def check_parity(got: torch.Tensor, want: torch.Tensor, cfg: dict, why: str) -> None:
    """ONNX Runtime against the reference, at its documented parity (README, "Export"): per
    image, in AR order, the head's outputs agree within ``ORT_ATOL x max(1, guidance)``
    (guidance scales the difference of two rows) up to the first block whose signs differ,
    and a sign may differ only where the reference's value is within that tolerance of zero.
    From there the two runs continue from different tokens, and are not compared."""
    ch, p = want.shape[-1] // 2, cfg["p"]
    tol = ORT_ATOL * max(1.0, cfg["guidance"])
    for image in range(want.shape[0]):
        xw, xg = want[image, :, ch:], got[image, :, ch:]  # [tokens in AR order, bits]
        flips = (torch.sign(xw) != torch.sign(xg)).any(-1).nonzero()
        end = (flips[0].item() // p + 1) * p if len(flips) else xw.shape[0]
        diff = (xw[:end] - xg[:end]).abs().max().item()
        assert diff <= tol, (f"onnxruntime: image {image}: head outputs differ by {diff:.2e} "
                             f"(> {tol:.1e}) before token {end}; {why}")
        if len(flips):
            block = slice(end - p, end)
            flipped = torch.sign(xw[block]) != torch.sign(xg[block])
            at = xw[block][flipped].abs().max().item()
            assert at <= tol, (f"onnxruntime: image {image}: a sign differs at a value "
                               f"{at:.2e} from zero (> {tol:.1e}), token {end - p}; {why}")


def check_config(tmp_path_factory, seed: int, wide: bool) -> None:
    cfg = draw_config(seed, wide)
    why = f"sweep seed {seed}: {json.dumps(cfg, ensure_ascii=False)[:400]}"
    path = _checkpoint(tmp_path_factory, cfg["p"], cfg["gan"])
    reqs = _requests(cfg)
    reference = _session(path, "reference")
    want = _tokens(reference, reqs)
    for variant in ("", "graphs"):
        got = _tokens(_session(path, "torch", variant), reqs)
        assert torch.equal(got, want), f"torch {variant or 'eager'}: {_where(got, want)}; {why}"
    # batch invariance: each request alone gives the tokens it got in the batch
    if len(reqs) > 1:
        start = 0
        for r in reqs:
            alone = _tokens(_session(path, "torch"), [r])
            part = want[start:start + r.num_images]
            assert torch.equal(alone, part), f"request alone: {_where(alone, part)}; {why}"
            start += r.num_images
    # pixels, where the reference decodes one image (it decodes a batch at once, as the
    # authors do; the runtime decodes image by image)
    if sum(r.num_images for r in reqs) == 1:
        plan = reference.plan(*reqs)
        ref = generate(reference.backend, plan, [(reqs[0].seed, 1)])
        fast = generate(_session(path, "torch").backend, plan, [(reqs[0].seed, 1)])
        assert torch.equal(ref, fast), f"pixels differ; {why}"
    if wide:
        ort = _session(path, "onnxruntime", export=_export(tmp_path_factory, path))
        check_parity(_tokens(ort, reqs), want, cfg, why)


@pytest.mark.parametrize("seed", range(FAST))
def test_backends_agree(tmp_path_factory, seed):
    check_config(tmp_path_factory, seed, wide=False)


@pytest.mark.parametrize("seed", range(FAST))
def test_onnxruntime_agrees(tiny_ckpt, tiny_export, seed):
    """ONNX Runtime on the shared P = 4 checkpoint (its small sizes) and its export."""
    cfg = draw_config(seed, wide=False, checkpoint=(4, False))
    why = f"sweep seed {seed}: {json.dumps(cfg, ensure_ascii=False)[:400]}"
    reqs = _requests(cfg)
    want = _tokens(_session(tiny_ckpt, "reference"), reqs)
    check_parity(_tokens(_session(tiny_ckpt, "onnxruntime", export=tiny_export), reqs), want,
                 cfg, why)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST, FAST + WIDE))
def test_backends_agree_wide(tmp_path_factory, seed):
    check_config(tmp_path_factory, seed, wide=True)
