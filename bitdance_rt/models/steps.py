"""The model's steps, each written once: the reference pipeline, every backend and every
exported graph call these (the AR loop that calls them: bitdance_rt/runtime/loop.py).

- :func:`llm_call`     the LLM over new tokens, positions continuing each row's cache
- :func:`prompt_pass`  a prompt's tokens through the LLM (causal)
- :func:`image_start`  the image-start block (``<|res_w|>``, queries) in block mode: the head
                       condition of image block 0
- :func:`block_step`   an image block's tokens through the projector and the LLM: the head
                       condition of the next block
- :func:`decode_tokens` +-1 tokens to a uint8 image

``model`` is anything with ``llm``, ``projector``, ``ae``, ``dtype`` and ``spec`` (a
:class:`~bitdance_rt.checkpoint.BitDanceModel`). ``cache`` is any KV cache of
:mod:`bitdance_rt.models.kv_cache` (or an exporter's), which knows each row's length and so
each new token's position (:meth:`positions`).
"""

from __future__ import annotations

import torch

from .posemb import tokens_to_latent


def tile_rows(x: torch.Tensor, rows) -> torch.Tensor:
    """``[B, ...]`` -> ``[rows, ...]`` with row s = ``x[s % B]`` (conditional rows, then
    unconditional rows). A gather, so an exported graph needs no ``rows == k * B`` relation."""
    batch = x.shape[0]
    if isinstance(rows, int) and isinstance(batch, int):  # eager: a concatenation
        return x if rows == batch else torch.cat([x] * (rows // batch))
    # B as a tensor: the exporter cannot take a symbolic size as remainder()'s scalar
    b = torch.ones(x.shape[:1], dtype=torch.int64, device=x.device).sum()
    return x.index_select(0, torch.remainder(torch.arange(rows, device=x.device), b))


def llm_call(model, embeds: torch.Tensor, cache, mode: str) -> torch.Tensor:
    """``embeds [R, T, H]`` through the LLM at positions ``cache.positions`` (each row's
    length onwards), ``mode`` "causal" or "block"; returns hidden states ``[R, T, H]`` (model
    dtype, after the final norm). The caller advances the cache."""
    rows, t = embeds.shape[0], embeds.shape[1]
    positions = cache.positions(rows, t, embeds.device)
    return model.llm.model(embeds.to(model.dtype), positions, cache, mode)


def prompt_pass(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """A prompt's tokens ``[R, T]`` (text, ``<|vision_start|>``, ``<|res_h|>``) with the
    causal mask; fills the cache, returns the hidden states (unused for images)."""
    return llm_call(model, model.llm.model.embed_tokens(ids), cache, "causal")


def image_start(model, block_ids: torch.Tensor, cache, pe: torch.Tensor) -> torch.Tensor:
    """The image-start block ``[R, P]`` in block mode over the prompt's cache; returns the head
    condition of image block 0, ``hidden + pe`` ``[R, P, H]`` (float32)."""
    return llm_call(model, model.llm.model.embed_tokens(block_ids), cache, "block") + pe


def block_step(model, tokens: torch.Tensor, pe: torch.Tensor, pe_next: torch.Tensor,
               cache) -> torch.Tensor:
    """The +-1 tokens ``[R, P, 32]`` of block k (one row per sequence) through the projector
    (plus block k's position embedding ``pe``) and the LLM in block mode; returns the head
    condition of block k + 1, ``hidden + pe_next`` ``[R, P, H]`` (float32)."""
    embeds = model.projector(tokens.to(model.dtype)) + pe
    return llm_call(model, embeds, cache, "block") + pe_next


def to_uint8(images: torch.Tensor, device="cpu") -> torch.Tensor:
    """``[B, 3, H, W]`` in about [-1, 1] -> ``[B, H, W, 3]`` uint8 (``trunc(clamp(127.5 img +
    128, 0, 255))``), on ``device`` (None: where the images are; an exported graph's)."""
    # clamped to [0, 255] first, truncation is floor; the cast is then exact in any runtime
    x = torch.floor(torch.clamp(127.5 * images.float() + 128.0, 0.0, 255.0))
    return x.permute(0, 2, 3, 1).to(device=device, dtype=torch.uint8)


def decode_tokens(model, tokens: torch.Tensor, h: int, w: int, noise: torch.Tensor | None = None,
                  per_image: bool = False) -> torch.Tensor:
    """``[B, h*w, 32]`` +-1 tokens (patch raster) -> uint8 images ``[B, 16h, 16w, 3]``.

    A gan-decoder checkpoint needs ``noise`` ``[B, 32, h, w]`` (drawn after all AR steps, see
    :class:`~bitdance_rt.sampling.NoiseSource`). ``per_image`` decodes one image at a time: the
    CPU's convolutions round differently for one image and for several, and the runtime keeps
    an image independent of the batch it was generated in; the reference decodes the batch as
    the authors do."""
    if model.spec.ae.gan_decoder and noise is None:
        raise ValueError("a gan-decoder checkpoint decodes with noise; draw it with the "
                         "request's NoiseSource")
    latent = tokens_to_latent(tokens.float(), h, w, model.spec.patch).to(model.dtype)
    noise = None if noise is None else noise.to(model.dtype)
    if not per_image:
        return to_uint8(model.ae.decode(latent, noise))
    return torch.cat([
        to_uint8(model.ae.decode(latent[i:i + 1], None if noise is None else noise[i:i + 1]))
        for i in range(latent.shape[0])])
