"""Checkpoint layout, strict loading, presets and the tiny checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.models.kv_cache import ConcatKVCache
from bitdance_rt.spec import preset
from bitdance_rt.tiny import random_model
from bitdance_rt.errors import CheckpointError
from bitdance_rt.models.autoencoder import BinaryAutoencoder
from bitdance_rt.models.head import DiffusionHead
from bitdance_rt.models.qwen3 import Qwen3ForCausalLM
from bitdance_rt.tiny import SPECIAL_TOKENS, make_tiny

RELEASED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "ae_config.json", "ae.safetensors", "vision_head_config.json",
                  "vision_head.safetensors", "projector.safetensors"}


def nparams(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,p", [("14b-64x", 64), ("14b-16x", 16), ("14b", 64)])
def test_14b_presets_have_released_sizes(name, p):
    spec = preset(name)
    assert spec.parallel_num == p
    with torch.device("meta"):
        llm, head, ae = Qwen3ForCausalLM(spec.llm), DiffusionHead(spec.head), BinaryAutoencoder(spec.ae)
    assert 14.6e9 < nparams(llm) < 15.0e9  # Qwen3-14B: ~14.8 B with embeddings and lm_head
    assert 1.74e9 < nparams(head) < 1.78e9
    assert 0.44e9 < nparams(ae) < 0.48e9
    assert 0.25e9 < nparams(ae.decoder) < 0.27e9


def test_unknown_preset_lists_choices():
    with pytest.raises(CheckpointError, match="14b-64x"):
        preset("13b")


def test_tiny_layout_and_size(tiny_ckpt):
    names = {f.name for f in tiny_ckpt.iterdir()}
    assert RELEASED_FILES <= names
    assert sum(f.stat().st_size for f in tiny_ckpt.iterdir()) <= 20e6
    head_cfg = json.loads((tiny_ckpt / "vision_head_config.json").read_text())
    assert list(head_cfg) == ["ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln",
                              "use_swiglu", "parallel_num", "time_shift", "time_schedule",
                              "P_mean", "P_std", "diff_batch_mul", "grad_checkpointing"]
    ae_cfg = json.loads((tiny_ckpt / "ae_config.json").read_text())
    assert len(ae_cfg["ddconfig"]["ch_mult"]) == 5 and ae_cfg["gan_decoder"] is False
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    for f in ("model.safetensors", "ae.safetensors", "vision_head.safetensors"):
        assert all(v.dtype == torch.float32 for v in load_file(tiny_ckpt / f).values())


def test_tiny_is_deterministic(tmp_path, tiny_ckpt):
    again = make_tiny(tmp_path / "again", parallel_num=4, seed=0)
    a, b = load_file(tiny_ckpt / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = make_tiny(tmp_path / "other", parallel_num=4, seed=5)
    c = load_file(other / "vision_head.safetensors")
    assert not torch.equal(c["net.cond_embed.weight"],
                           load_file(tiny_ckpt / "vision_head.safetensors")["net.cond_embed.weight"])


def test_tiny_rejects_bad_parallel(tmp_path):
    with pytest.raises(Exception, match="4, 16, 64"):
        make_tiny(tmp_path, parallel_num=8)


def test_mid_checkpoint_is_the_mid_preset(tmp_path):
    from bitdance_rt.errors import BitDanceError

    path = make_tiny(tmp_path / "mid", parallel_num=16, seed=1, size="mid")
    model = load_checkpoint(path, weights=False)
    assert model.spec.config_hash() == preset("mid").config_hash()
    with pytest.raises(BitDanceError, match="--size"):
        make_tiny(tmp_path / "x", size="huge")


def test_tokenizer_matches_transformers(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    ours = load_checkpoint(tiny_ckpt).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    for text in ["<|im_start|>user\nA café at 3am, neon “signs” 東京<|im_end|>\n<|im_start|>assistant\n",
                 "<|im_start|>assistant\n", "plain  text\twith\nnewlines 12345"]:
        assert ours.encode(text) == theirs.encode(text)
    for tok in SPECIAL_TOKENS:
        assert ours.token_id(tok) == theirs.convert_tokens_to_ids(tok)


def test_opens_with_transformers(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3ForCausalLM.from_pretrained(tiny_ckpt).eval()
    ours = load_checkpoint(tiny_ckpt).llm
    assert nparams(model.model) == nparams(ours.model)  # (the LM head is not loaded)
    ids = torch.randint(0, 640, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.model(input_ids=ids).last_hidden_state
        mine = ours.model(ours.model.embed_tokens(ids), torch.arange(9)[None].expand(2, 9),
                          ConcatKVCache(ours.config.num_hidden_layers), "causal")
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_file_is_named(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (d / "vision_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vision_head.safetensors is missing"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_key_is_named(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    sd = load_file(d / "projector.safetensors")
    del sd["fc2.bias"]
    save_file(sd, d / "projector.safetensors")
    with pytest.raises(CheckpointError, match=r"projector.safetensors.*'fc2.bias'"):
        load_checkpoint(d)


def test_unexpected_key_is_named(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    sd = load_file(d / "vision_head.safetensors")
    sd["net.extra.weight"] = torch.zeros(2)
    save_file(sd, d / "vision_head.safetensors")
    with pytest.raises(CheckpointError, match=r"vision_head.safetensors.*net.extra.weight"):
        load_checkpoint(d)


def test_wrong_shape_is_named(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key] = sd[key][:-1].contiguous()
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model.safetensors.*{key}.*shape"):
        load_checkpoint(d)


def test_sharded_checkpoint_loads_same(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].to(torch.bfloat16) for k in ks}, d / name)
        weight_map.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    m = load_checkpoint(d, dtype=torch.float32)
    w = m.llm.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, sd["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16).float())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_checkpoint(d)


def test_head_config_keys_checked(tmp_path, tiny_ckpt):
    d = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "vision_head_config.json").read_text())
    cfg["depth"] = 3
    (d / "vision_head_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="extra.*depth"):
        load_checkpoint(d)


def test_dtype_conversion(tiny_ckpt):
    m = load_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    assert m.head.net.cond_embed.weight.dtype == torch.bfloat16
    assert m.ae.decoder.conv_in.weight.dtype == torch.bfloat16


def test_random_model_any_preset():
    """Seeded, and scaled so that activations stay O(1): a linear layer's weights have a
    standard deviation of 1/sqrt(fan_in), norms are near 1, biases small."""
    a, b = random_model(preset("tiny"), seed=3), random_model(preset("tiny"), seed=3)
    c = random_model(preset("tiny"), seed=4)
    wa = a.llm.model.layers[0].mlp.up_proj.weight
    assert torch.equal(wa, b.llm.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(wa, c.llm.model.layers[0].mlp.up_proj.weight)
    assert abs(wa.std().item() * wa.shape[1] ** 0.5 - 1) < 0.05
    norm = a.llm.model.layers[0].input_layernorm.weight
    assert abs(norm.mean().item() - 1) < 0.05 and 0.05 < norm.std().item() < 0.15
    assert a.llm.lm_head is None and a.ae.encoder is None
