"""tools/train_demo.py: the teacher-forced training forward is the inference computation, the
step functions train, and what the script writes loads and generates through the pipeline."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_rt.checkpoint import load_checkpoint, load_tokenizer
from bitdance_rt.demo import WEIGHTS_DIR
from bitdance_rt.models.kv_cache import ConcatKVCache
from bitdance_rt.models.posemb import image_posemb, tokens_to_latent
from bitdance_rt.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# the shipped model on its first 12 held-out prompts (measured 0.852 overall, colour 1.0; on
# all 120: 0.899 and 0.988, bench/demo_adherence.sh): a gate a little below, for the platform
SHIPPED_OVERALL, SHIPPED_COLOUR = 0.8, 0.9


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load("train_demo", ROOT / "tools" / "train_demo.py")
A = _load("bench_adherence", ROOT / "bench" / "adherence.py")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return load_tokenizer(d)


@pytest.mark.parametrize("seed", [0, 1])
def test_patch_raster_roundtrip(seed):
    lat = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(seed))
    for patch in (1, 2, 4, 8):
        tokens = T.latent_to_tokens(lat, patch)
        assert tokens.shape == (2, 64, 32), f"seed {seed}, patch {patch}"
        # token 0 is the top-left latent, token patch*patch - 1 the last of the first patch
        assert torch.equal(tokens[:, 0], lat[:, :, 0, 0]), f"seed {seed}, patch {patch}"
        last = tokens[:, patch * patch - 1]
        assert torch.equal(last, lat[:, :, patch - 1, patch - 1]), f"seed {seed}, patch {patch}"
        back = tokens_to_latent(tokens, 8, 8, patch)
        assert torch.equal(back, lat), f"seed {seed}, patch {patch}"


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_teacher_forcing_equals_incremental_inference(preset, tokenizer):
    """The block-causal training pass gives the head conditions that the reference pipeline's
    prefill + block steps (growing cache) compute, for rows of different text lengths."""
    torch.manual_seed(0)
    cfg = T.PRESETS[preset]
    m = T.build_ar_models(cfg, 0)
    with torch.no_grad():
        for mod in m.values():
            for p in mod.parameters():
                p.normal_(0, 0.05)
    h = w = cfg.latent
    p = cfg.parallel_num
    tokens = torch.sign(torch.randn(2, h * w, 32))
    texts = [T.conditional_text("a red circle on the left, on a white background"),
             T.UNCONDITIONAL_TEXT]
    batch = T.build_batch(tokenizer, texts, tokens, h, w, p, [True, False])
    pe = image_posemb(cfg.llm["hidden_size"], h, w, cfg.patch)
    with torch.no_grad():
        cond, _ = T.ar_forward(m["llm"], m["projector"], batch, pe, p)
        for i, text in enumerate(texts):
            ids = T.sequence_ids(tokenizer, text, h, w, p)
            emb = m["llm"].model.embed_tokens(torch.tensor(ids))[None]
            cache = ConcatKVCache(cfg.llm["num_hidden_layers"])

            def llm(e, mode):
                pos = torch.arange(cache.length, cache.length + e.shape[1])[None]
                return m["llm"].model(e, pos, cache, mode)

            llm(emb[:, :-p], "causal")
            hidden = llm(emb[:, -p:], "block")
            for k in range(h * w // p):
                blk = slice(k * p, (k + 1) * p)
                torch.testing.assert_close(hidden[0] + pe[blk], cond[i, k], atol=1e-5, rtol=1e-5)
                if k < h * w // p - 1:
                    hidden = llm(m["projector"](tokens[i:i + 1, blk]) + pe[blk], "block")


def test_losses_are_finite_and_fall(tokenizer):
    cfg = T.PRESETS["smoke"]
    torch.manual_seed(0)
    ae = T.BinaryAutoencoder(cfg.ae_config())
    T.init_ae(ae)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    x = T.images_tensor(range(4), cfg.size)
    losses = []
    for _ in range(8):
        loss, stats = T.ae_loss(ae, x, cfg.ae_entropy_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["rec"])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]

    ae.eval().requires_grad_(False)
    models = T.build_ar_models(cfg, 0)
    m = {**models, "ae": ae,
         "posemb": image_posemb(cfg.llm["hidden_size"], cfg.latent, cfg.latent, cfg.patch)}
    params = [p for mod in models.values() for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3)
    flows = []
    for step in range(8):
        loss, stats = T.ar_loss(m, tokenizer, cfg, range(4), T.step_generator(0, "ar", 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        flows.append(stats["flow"])
        assert math.isfinite(stats["text"])
    assert all(math.isfinite(v) for v in flows) and flows[-1] < flows[0]


def test_script_writes_a_loadable_checkpoint_and_resumes(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--preset", "smoke", "--work", str(work), "--out", str(out), "--threads", "1",
            "--log-every", "1"]
    T.main(args + ["--stage", "all"])
    log = capsys.readouterr().out
    assert "[ae] step 3/3" in log and "[ar] step 3/3" in log and "nan" not in log
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "ae_config.json", "ae.safetensors",
            "vision_head_config.json", "vision_head.safetensors", "projector.safetensors",
            "tokenizer.json", "bitdance_rt.json"} <= names
    meta = json.loads((out / "bitdance_rt.json").read_text())
    assert meta["name"] == "bitdance-demo-shapes" and meta["sizes"] == [[64, 64]]
    assert {"height", "width", "steps", "guidance"} <= set(meta["defaults"])
    assert "circle" in meta["vocabulary"] and meta["description"]
    d = meta["defaults"]

    model = load_checkpoint(out, load_encoder=True)
    assert model.spec.info.sizes == ((64, 64),) and model.spec.info.name == meta["name"]
    from bitdance_rt.request import GenerationRequest, plan_for
    from bitdance_rt.runtime import generate
    from bitdance_rt.runtime.backends.reference import ReferenceBackend
    from bitdance_rt.runtime.backends.torch_backend import TorchBackend

    # no size, steps or guidance given: the model's own defaults
    plan = plan_for(model, GenerationRequest("a red circle on the left, on a white background"))
    assert (plan.h, plan.w, plan.steps, plan.guidance) == (4, 4, d["steps"], d["guidance"])
    img = generate(ReferenceBackend(model), plan, 0)
    assert img.shape == (1, 64, 64, 3) and img.dtype == torch.uint8
    # the torch backend runs it too, with the same image
    assert torch.equal(generate(TorchBackend(model), plan, 0), img)

    # resume: continue the AR stage to 5 steps from the saved state at 3
    T.main(args + ["--stage", "ar", "--ar-steps", "5", "--resume"])
    log = capsys.readouterr().out
    assert "[ar] resumed at step 3" in log and "[ar] step 5/5" in log
    assert json.loads((out / "bitdance_rt.json").read_text())["training"]["ar_steps"] == 5
    # stop early within a longer schedule, then the released state is that step's
    T.main(args + ["--stage", "ar", "--ar-steps", "8", "--stop-at", "6", "--resume"])
    log = capsys.readouterr().out
    assert "[ar] step 6/8" in log and "step 7/8" not in log
    assert json.loads((out / "bitdance_rt.json").read_text())["training"]["ar_steps"] == 6


def test_shipped_demo_weights():
    """The package's demo model: within 20 MB, its defaults among its sizes, and its images
    follow their prompts (a few held-out prompts at the defaults; the full 120-prompt table is
    bench/demo_adherence.sh)."""
    files = [f for f in WEIGHTS_DIR.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 10**6
    meta = json.loads((WEIGHTS_DIR / "bitdance_rt.json").read_text())
    d = meta["defaults"]
    assert [d["height"], d["width"]] in meta["sizes"]
    session = A.open_session(WEIGHTS_DIR, "torch")
    from bitdance_rt.demo import detect, shapes

    prompts = [caption for _, caption, _ in shapes.heldout(12)]
    images = A.generate_images(session, prompts, list(range(12)), batch=4)
    assert images[0].shape == (d["height"], d["width"], 3)
    res = detect.score(images, prompts)
    assert res["overall"] >= SHIPPED_OVERALL and res["by_kind"]["colour"] >= SHIPPED_COLOUR, \
        detect.format_score(res)
