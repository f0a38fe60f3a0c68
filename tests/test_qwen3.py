"""Our Qwen3 against transformers' Qwen3Model (the test-time oracle) on a tiny config."""

import pytest
import torch

from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.models.kv_cache import ConcatKVCache, StaticKVCache

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    ours = load_checkpoint(tiny_ckpt).llm.model
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(
        tiny_ckpt, torch_dtype=torch.float32).model.eval()
    return ours, theirs


def hf_run(model, chunks):
    """Feed chunks of embeddings [1, T, H] as the authors' pipeline does: causal first, then
    blocks with an all-true 4-D mask. Returns the hidden states of every chunk."""
    outs, pkv = [], None
    for i, emb in enumerate(chunks):
        kw = {}
        if i > 0:
            past = pkv.get_seq_length()
            kw["attention_mask"] = torch.ones((emb.shape[0], 1, emb.shape[1], past + emb.shape[1]),
                                              dtype=torch.bool)
        o = model(inputs_embeds=emb, past_key_values=pkv, use_cache=True, **kw)
        pkv = o.past_key_values
        outs.append(o.last_hidden_state)
    return outs


def chunks_for(lengths, hidden, gen):
    return [torch.randn(1, n, hidden, generator=gen) for n in lengths]


@torch.no_grad()
def test_concat_cache_bit_exact(pair):
    ours, theirs = pair
    gen = torch.Generator().manual_seed(1)
    chunks = chunks_for([13, 4, 4, 4], ours.config.hidden_size, gen)
    ref = hf_run(theirs, chunks)
    cache = ConcatKVCache(ours.config.num_hidden_layers)
    pos = 0
    for i, emb in enumerate(chunks):
        t = emb.shape[1]
        p = torch.arange(pos, pos + t)[None]
        out = ours(emb, p, cache, "causal" if i == 0 else "block")
        pos += t
        assert torch.equal(out, ref[i]), f"chunk {i}: max err {(out - ref[i]).abs().max()}"


@torch.no_grad()
def test_static_cache_ragged_batch(pair):
    """Two sequences of different prompt lengths in one batch, one preallocated cache."""
    ours, theirs = pair
    cfg = ours.config
    gen = torch.Generator().manual_seed(2)
    prompt_lens, block = [11, 6], 4
    seqs = [chunks_for([n, block, block], cfg.hidden_size, gen) for n in prompt_lens]
    refs = [hf_run(theirs, s) for s in seqs]

    cache = StaticKVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 40, cfg.head_dim,
                          torch.float32, "cpu")
    # Prompt: right-padded to the longest; padded slots are overwritten by the next block.
    tmax = max(prompt_lens)
    emb = torch.zeros(2, tmax, cfg.hidden_size)
    for b, n in enumerate(prompt_lens):
        emb[b, :n] = seqs[b][0][0]
    pos = torch.arange(tmax)[None].expand(2, -1)
    out = ours(emb, pos, cache, "causal")
    for b, n in enumerate(prompt_lens):
        torch.testing.assert_close(out[b, :n], refs[b][0][0], rtol=1e-5, atol=1e-5)
    cache.advance(prompt_lens)
    for k in (1, 2):
        emb = torch.cat([seqs[b][k] for b in range(2)])
        pos = torch.tensor(cache.lens_host)[:, None] + torch.arange(block)
        out = ours(emb, pos, cache, "block")
        cache.advance(block)
        for b in range(2):
            torch.testing.assert_close(out[b], refs[b][k][0], rtol=1e-5, atol=1e-5)


def test_rejects_unknown_mode(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="attention mode"):
        ours(torch.zeros(1, 2, ours.config.hidden_size), torch.zeros(1, 2, dtype=torch.long),
             ConcatKVCache(ours.config.num_hidden_layers), "sliding")
