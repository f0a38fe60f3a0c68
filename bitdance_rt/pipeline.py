"""The eager reference pipeline: the authors' generation semantics (SPEC section 2), kept as the
baseline every faster backend is compared against.

Like the authors' pipeline it runs the conditional and unconditional sequences as separate LLM
calls, grows the KV cache by concatenation, runs one LLM call after the last block and launches
every sampler step from Python. Its float32 CPU output reproduces the authors' pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import BitDanceModel
from .errors import UnsupportedSizeError
from .models.kv_cache import ConcatKVCache
from .models.posemb import image_posemb, tokens_to_latent
from .sampling import draw_block_noise, sample_block, time_grid

# (height, width) in pixels, as trained.
SUPPORTED_SIZES = (
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024),
    (896, 1152), (768, 1280), (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024),
)
LATENT_STRIDE = 16

StepCallback = Callable[[int, int], None]


def check_size(height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) of a supported pixel size; a clear error listing the sizes otherwise."""
    if (height, width) not in SUPPORTED_SIZES:
        sizes = ", ".join(f"{h}x{w}" for h, w in SUPPORTED_SIZES)
        raise UnsupportedSizeError(
            f"image size {height}x{width} (height x width) is not supported; "
            f"choose one of: {sizes}")
    return height // LATENT_STRIDE, width // LATENT_STRIDE


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance: float = 7.5
    seed: int = 42
    num_images: int = 1

    def validate(self) -> tuple[int, int]:
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1.0 (1.0 disables it), got {self.guidance}")
        return check_size(self.height, self.width)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0


def conditional_text(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


UNCONDITIONAL_TEXT = "<|im_start|>assistant\n"


def sequence_ids(tokenizer, text: str, h: int, w: int, parallel_num: int) -> list[int]:
    """Text tokens, ``<|vision_start|>``, ``<|res_h|>``, ``<|res_w|>``, P-1 query tokens."""
    image = ["<|vision_start|>", f"<|res_{h}|>", f"<|res_{w}|>"]
    image += [f"<|query_{i}|>" for i in range(1, parallel_num)]
    return tokenizer.encode(text) + [tokenizer.token_id(t) for t in image]


def prompt_sequences(model: BitDanceModel, req: GenerationRequest, h: int, w: int):
    """Token id lists: the conditional sequence, then (with guidance) the unconditional one."""
    p = model.spec.parallel_num
    seqs = [sequence_ids(model.tokenizer, conditional_text(req.prompt), h, w, p)]
    if req.cfg:
        seqs.append(sequence_ids(model.tokenizer, UNCONDITIONAL_TEXT, h, w, p))
    return seqs


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in about [-1, 1] -> ``[B, H, W, 3]`` uint8 on the CPU (truncating)."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


class HeadFn:
    """The head network as the sampler sees it: float32 in and out, model dtype inside."""

    def __init__(self, model: BitDanceModel):
        self.net = model.head.net
        self.dtype = model.dtype

    def __call__(self, x, t, cond):
        return self.net(x.to(self.dtype), t, cond.to(self.dtype)).float()


def decode_tokens(model: BitDanceModel, tokens: torch.Tensor, h: int, w: int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, h*w, 32]`` +-1 tokens (patch raster) -> uint8 images ``[B, 16h, 16w, 3]``.

    A gan-decoder checkpoint draws its noise here (after all AR steps) unless ``noise`` is given.
    """
    latent = tokens_to_latent(tokens.float(), h, w, model.spec.patch)
    if model.spec.ae.gan_decoder and noise is None:
        noise = torch.randn(latent.shape, device=latent.device, dtype=torch.float32)
    if noise is not None:
        noise = noise.to(model.dtype)
    return to_uint8(model.ae.decode(latent.to(model.dtype), noise))


class ReferencePipeline:
    """Eager generation with the authors' semantics (and their inefficiencies)."""

    name = "reference"

    def __init__(self, model: BitDanceModel):
        self.model = model
        self.head_fn = HeadFn(model)

    def _llm(self, cache: ConcatKVCache, embeds: torch.Tensor, mode: str) -> torch.Tensor:
        start = cache.length
        t = embeds.shape[1]
        pos = torch.arange(start, start + t, device=embeds.device)[None].expand(embeds.shape[0], t)
        return self.model.llm.model(embeds.to(self.model.dtype), pos, cache, mode)

    def _prefill(self, ids, batch: int):
        m = self.model
        p = m.spec.parallel_num
        emb = m.llm.model.embed_tokens(torch.tensor(ids, device=m.device))
        emb = emb[None].repeat(batch, 1, 1)
        cache = ConcatKVCache(m.spec.llm.num_hidden_layers)
        self._llm(cache, emb[:, :-p], "causal")
        hidden = self._llm(cache, emb[:, -p:], "block")
        return cache, hidden

    def weight_bytes(self) -> dict:
        from .runtime.timing import module_bytes

        llm = self.model.llm.model
        layers = module_bytes(llm.layers) + module_bytes(llm.norm)
        return {"llm": layers, "projector": module_bytes(self.model.projector),
                "head": module_bytes(self.model.head), "decode": module_bytes(self.model.ae.decoder)}

    @torch.no_grad()
    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None, timer=None):
        """uint8 images ``[B, H, W, 3]`` (CPU)."""
        from .runtime.loop import plan_for

        return self.generate_plan(plan_for(self.model, req), req.seed, on_step, timer)

    @torch.no_grad()
    def generate_plan(self, plan, seed: int, on_step: StepCallback | None = None, timer=None):
        from .runtime.timing import StageTimer

        timer = timer or StageTimer(self.model.device, enabled=False)
        timer.start()
        tokens = self.generate_tokens(plan, seed, on_step, timer)
        noise = None
        if self.model.spec.ae.gan_decoder:
            noise = torch.randn((plan.images, tokens.shape[-1], plan.h, plan.w),
                                device=self.model.device)
        with timer.stage("decode", weight_bytes=self.weight_bytes()["decode"]):
            images = decode_tokens(self.model, tokens, plan.h, plan.w, noise)
        timer.stop()
        return images

    @torch.no_grad()
    def generate_tokens(self, plan, seed: int, on_step: StepCallback | None = None, timer=None):
        """The +-1 tokens ``[B, h*w, 32]`` in patch raster order (seeds the global generator)."""
        from .runtime.timing import StageTimer

        timer = timer or StageTimer(self.model.device, enabled=False)
        m = self.model
        h, w, b = plan.h, plan.w, plan.images
        p = m.spec.parallel_num
        wb = self.weight_bytes()
        n_seq = len(plan.seq_ids)
        torch.manual_seed(seed)
        posemb = image_posemb(m.spec.llm.hidden_size, h, w, m.spec.patch).to(m.device)[None]
        with timer.stage("prefill", calls=2 * n_seq, weight_bytes=2 * n_seq * wb["llm"]):
            caches, hiddens = zip(*(self._prefill(list(ids), b) for ids in plan.seq_ids))
        ts, dts = time_grid(plan.steps, m.spec.head.time_shift)
        num_blocks = h * w // p
        out_tokens = []
        for k in range(num_blocks):
            pe = posemb[:, k * p:(k + 1) * p]
            cond = torch.cat(hiddens, dim=0) + pe
            noise = draw_block_noise(b, p, m.spec.head.ch_target, plan.steps, m.device)
            with timer.stage("head", calls=plan.steps + 1,
                             weight_bytes=(plan.steps + 1) * wb["head"]):
                x = sample_block(self.head_fn, cond, noise, plan.guidance, ts, dts)
            tokens = torch.sign(torch.cat([x] * n_seq, dim=0))
            out_tokens.append(tokens[:b])
            # Like the authors' pipeline, this also runs after the last block (unused).
            with timer.stage("block_step", calls=n_seq,
                             weight_bytes=n_seq * wb["llm"] + wb["projector"]):
                embeds = m.projector(tokens.to(m.dtype)) + pe
                hiddens = tuple(
                    self._llm(cache, embeds[i * b:(i + 1) * b], "block")
                    for i, cache in enumerate(caches))
            if on_step:
                on_step(k + 1, num_blocks)
        return torch.cat(out_tokens, dim=1)
