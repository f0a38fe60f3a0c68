"""``bitdance-rt memory``: the GPU memory a generation needs, from the shapes alone.

Nothing is allocated: the weights are counted on a meta-device model (with a recipe, its
quantized layers swapped in as they are when a quantized checkpoint loads), the KV cache and the
head's modulations come from the formulas the backends allocate with
(:meth:`~bitdance_rt.models.kv_cache.StaticKVCache.nbytes_for`,
:func:`~bitdance_rt.runtime.buffers.modulation_bytes`), and the activations are measured by
running the runtime's own step functions on meta tensors while a dispatch mode keeps the sum
of live tensor storage (:class:`PeakTracker`): the prompt pass, one block step, the head's
sampling loop for one block and the decoder (one image at a time, as the PyTorch backend
decodes).

What the PyTorch backend holds on CUDA, and so what the budget adds up:

- weights, per component (the LM head and the autoencoder's encoder are never loaded);
- the KV cache (2B sequences with guidance, prompt + image slots);
- head buffers: the modulations of every step of a block (computed once per block);
- CUDA-graph pools: the head loop and the block step are captured graphs, each keeping its
  peak of intermediate tensors allocated in a private pool for the session;
- activations: the largest transient of the stages that run outside graphs (prompt pass,
  decoder), reused between them by the caching allocator;
- the CUDA context and library workspaces: a typical figure, not computed.

The measured activations are what the tensors need; the caching allocator rounds blocks up
and can fragment, so leave some headroom on a card that fits with little to spare.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .models.quant import swap_modules
from .calibration.recipes import HEAD, LLM, get_recipe, quantized_names

GIB = 2**30
CUDA_CONTEXT = int(0.75 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces (typical; not computed)
CARDS_GB = (16, 24, 32, 48, 80, 141)
WEIGHTS = {"fp8": "E4M3", "int8": "INT8"}  # common card sizes, GiB as the vendors count them


@dataclass
class Line:
    group: str     # weights, kv cache, head buffers, cuda graphs, activations, runtime
    name: str
    nbytes: int
    note: str = ""


@dataclass
class Budget:
    title: str
    lines: list

    @property
    def total(self) -> int:
        return sum(line.nbytes for line in self.lines)

    def group(self, group: str) -> int:
        return sum(line.nbytes for line in self.lines if line.group == group)

    def fits(self, card_gb: float) -> bool:
        return self.total <= card_gb * GIB

    def table(self) -> str:
        rows = [self.title, f"{'':<13}{'':<34}{'GiB':>8}", "-" * 60]
        for line in self.lines:
            rows.append(f"{line.group:<13}{line.name:<34}{line.nbytes / GIB:>8.2f}"
                        + (f"  {line.note}" if line.note else ""))
        rows.append("-" * 60)
        rows.append(f"{'total':<47}{self.total / GIB:>8.2f}")
        fits = ", ".join(f"{gb} GB {'yes' if self.fits(gb) else 'no'}" for gb in CARDS_GB)
        rows.append(f"fits: {fits}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Live-storage tracking on meta tensors


class PeakTracker(TorchDispatchMode):
    """Sum of the storage bytes of live tensors made inside the mode, and its peak. Tensors
    that existed before (weights, inputs, the cache) and views or in-place results of any
    tracked or known storage are not counted again."""

    def __init__(self, known=()):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.refs: dict[int, int] = {}   # storage -> live tensors referring to it
        self.size: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self.known:
            return
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
            self.current += self.size[key]
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.size.pop(key)
            del self.refs[key]


def _tensors(*objs):
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            yield from obj.parameters()
            yield from obj.buffers()
        elif isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            yield from _tensors(*obj)


def peak_bytes(fn, *known) -> int:
    """Peak bytes of the tensors ``fn()`` makes (run it on meta tensors); ``known``: modules
    and tensors that exist before (not counted)."""
    tracker = PeakTracker(list(_tensors(*known)))
    with torch.no_grad(), tracker:
        out = fn()
        del out
    return tracker.peak


# ----------------------------------------------------------------------------------------------
# The model on the meta device


def _layout(recipe, llm, head) -> dict | None:
    if recipe is None:
        return None
    entry = {"format": recipe.fmt, "activation": recipe.activation, "smooth": recipe.smooth}
    return {"modules": {LLM: {n: entry for n in quantized_names(LLM, llm)},
                        HEAD: {n: entry for n in quantized_names(HEAD, head)}}}


def meta_model(spec, recipe_name: str | None = None, dtype=torch.bfloat16):
    """A :class:`~bitdance_rt.checkpoint.BitDanceModel` on the meta device with what the
    runtime loads (no LM head, no encoder), quantized as ``recipe_name`` would make it."""
    from .checkpoint import BitDanceModel
    from .models.autoencoder import BinaryAutoencoder
    from .models.head import DiffusionHead
    from .models.projector import Projector
    from .models.qwen3 import Qwen3ForCausalLM, rope_inv_freq

    recipe = get_recipe(recipe_name) if recipe_name else None
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(spec.llm).to(dtype)
        llm.lm_head = None
        head = DiffusionHead(spec.head).to(dtype)
        ae = BinaryAutoencoder(spec.ae).to(dtype)
        ae.encoder = None
        proj = Projector(spec.ae.z_channels, spec.llm.hidden_size).to(dtype)
        layout = _layout(recipe, llm, head)
        swap_modules(llm, layout, LLM)
        swap_modules(head, layout, HEAD)
    llm.model.register_buffer("inv_freq", rope_inv_freq(spec.llm.head_dim, spec.llm.rope_theta)
                              .to("meta"), persistent=False)
    for m in (llm, head, ae, proj):
        m.eval().requires_grad_(False)
    return BitDanceModel(spec, llm, head, ae, proj, None, dtype, torch.device("meta"), None)


def state_bytes(module) -> int:
    """Bytes of a module's state dict (parameters and persistent buffers) as loaded."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# ----------------------------------------------------------------------------------------------
# The budget


def _stage_peaks(model, rows: int, images: int, prompt_tokens: int, h: int, w: int,
                 steps: int) -> dict:
    """Transient peak bytes of each stage, on meta tensors, with the runtime's code."""
    from .models.kv_cache import StaticKVCache
    from .models.steps import block_step, image_start, prompt_pass
    from .runtime.buffers import modulation_bytes
    from .sampling import head_modulations, head_step, premodulated, step_schedule

    spec, dt, dev = model.spec, model.dtype, torch.device("meta")
    cfg, p, hid = spec.llm, spec.parallel_num, spec.llm.hidden_size
    parts = (model.llm, model.head, model.ae, model.projector)
    max_len = prompt_tokens + h * w - p
    cache = StaticKVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len,
                          cfg.head_dim, dt, dev)
    known = parts + (cache.k, cache.v, cache.lens)
    ids = torch.zeros((rows, prompt_tokens - 3), dtype=torch.long, device=dev)
    block_ids = torch.zeros((rows, p), dtype=torch.long, device=dev)
    pe = torch.zeros((p, hid), device=dev)

    def prefill():
        prompt_pass(model, ids, cache)
        cache.advance(prompt_tokens - 3)
        out = image_start(model, block_ids, cache, pe)
        cache.advance(p)
        return out

    peaks = {"prefill": peak_bytes(prefill, *known, ids, block_ids, pe)}
    tokens = torch.zeros((rows, p, spec.head.ch_target), device=dev)
    peaks["block_step"] = peak_bytes(lambda: block_step(model, tokens, pe, pe, cache),
                                     *known, tokens, pe)
    # The head loop (TorchBackend._sample): the modulations of all N + 1 steps first, live
    # until the block ends, then N + 1 steps that each allocate the same.
    times, coeffs = step_schedule(steps, spec.head.time_shift)
    times, coeffs = times.to(dev), coeffs.to(dev)
    cond = torch.zeros((rows, p, hid), device=dev)
    mods = []
    peak_mods = peak_bytes(lambda: mods.append(head_modulations(model.head.net, cond, times, dt)),
                           *known, times, coeffs, cond)
    ada, final = mods.pop()
    denoise_at = premodulated(model.head.net, (ada, final), dt)  # the runtime's step
    x = torch.zeros((images, p, spec.head.ch_target), device=dev)
    step = peak_bytes(lambda: head_step(lambda x_in: denoise_at(0, x_in), x, coeffs[0], x,
                                        7.5 if rows > images else 1.0, rows),
                      *known, cond, x, ada, final)
    peaks["head"] = max(peak_mods, modulation_bytes(spec, rows, steps, dt) + step)
    latent = torch.zeros((1, spec.ae.z_channels, h, w), dtype=dt, device=dev)
    dec_noise = torch.zeros_like(latent) if spec.ae.gan_decoder else None
    peaks["decode"] = peak_bytes(lambda: model.ae.decode(latent, dec_noise), *known, latent,
                                 dec_noise)
    return peaks


def memory_budget(spec, recipe: str | None = None, height: int | None = None,
                  width: int | None = None, images: int = 1, steps: int | None = None,
                  guidance: float | None = None, prompt_tokens: int = 256,
                  dtype=torch.bfloat16) -> Budget:
    """The GPU memory of one generation with the PyTorch backend on CUDA (graphs on), from
    ``spec``'s shapes; ``recipe`` None is the float checkpoint in ``dtype``."""
    from .errors import BitDanceError
    from .models.kv_cache import StaticKVCache
    from .runtime.buffers import modulation_bytes

    # the same checks and defaults as a request to generate (GenerationRequest.validate), and
    # the prompt and image within the model's positions (check_context), as generate checks
    from .request import GenerationRequest, ImagePlan, check_context

    r = GenerationRequest("memory plan", height, width, steps, guidance,
                          num_images=images).resolved(spec)
    h, w = r.validate(spec)
    height, width, steps, guidance = r.height, r.width, r.steps, r.guidance
    if not isinstance(prompt_tokens, int) or prompt_tokens < 4:
        raise BitDanceError(f"--prompt-tokens must be at least 4, got {prompt_tokens}")
    limit = spec.llm.max_position_embeddings
    if prompt_tokens > limit:
        raise BitDanceError(f"--prompt-tokens {prompt_tokens} is more than this model's {limit} "
                            "positions; lower it")
    row = (0,) * prompt_tokens  # a sequence of --prompt-tokens (its KV slots: max_len below)
    check_context(ImagePlan(h, w, (row,) * images, row if r.cfg else None, steps,
                            float(guidance), (r,)), spec)
    rows = images * (2 if guidance > 1 else 1)
    model = meta_model(spec, recipe, dtype)
    llm, net = model.llm.model, model.head.net
    compute = str(dtype).replace("torch.", "")
    fmt = (f"{recipe} ({WEIGHTS[get_recipe(recipe).fmt]} weights, {compute} compute)" if recipe
           else f"{compute} weights")
    lines = [
        Line("weights", "language model layers", state_bytes(llm.layers) + state_bytes(llm.norm)),
        Line("weights", "token embeddings", state_bytes(llm.embed_tokens),
             "read for the prompt only"),
        Line("weights", "diffusion head", state_bytes(net)),
        Line("weights", "projector", state_bytes(model.projector)),
        Line("weights", "decoder", state_bytes(model.ae)),
    ]
    cfg, p = spec.llm, spec.parallel_num
    max_len = prompt_tokens + h * w - p
    lines.append(Line("kv cache", f"{rows} seq x {max_len} slots", StaticKVCache.nbytes_for(
        cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype)))
    mods = modulation_bytes(spec, rows, steps, dtype)
    lines.append(Line("head buffers", f"modulations, {steps + 1} steps", mods))
    peaks = _stage_peaks(model, rows, images, prompt_tokens, h, w, steps)
    lines.append(Line("cuda graphs", "head loop pool", max(0, peaks["head"] - mods),
                      "its transients (modulations above)"))
    lines.append(Line("cuda graphs", "block step pool", peaks["block_step"]))
    stage = max(("prefill", "decode"), key=lambda k: peaks[k])
    lines.append(Line("activations", f"largest: {stage}", peaks[stage],
                      f"prefill {peaks['prefill'] / GIB:.2f}, decoder {peaks['decode'] / GIB:.2f}"))
    lines.append(Line("runtime", "CUDA context, workspaces", CUDA_CONTEXT, "typical, not computed"))
    title = (f"GPU memory budget: {spec.name}, {fmt}, {height}x{width}, {images} image(s), "
             f"N = {steps}, {'guidance on' if rows > images else 'no guidance'} ({rows} "
             f"sequences), prompts up to {prompt_tokens} tokens")
    return Budget(title, lines)
