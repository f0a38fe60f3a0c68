"""Class-conditional sampling, seed for seed the authors' ``model.sample``.

For labels ``[B]``, seed S, N head steps and guidance G, :func:`generate` gives the images of
``torch.manual_seed(S); model.sample(labels, sample_steps=N, cfg_scale=G)`` turned into uint8
as the authors' sampling script does (exactly, on the CPU in float32). What that takes:

- with guidance (G > 1) every sequence runs twice in one batch, ``[labels; null class]``;
- the guidance of AR step k is ``1 + (G - 1) k / K`` (K steps per image), so the first step
  has none: there the conditional and unconditional rows are sampled separately (2B rows of
  noise), and from the second step on the head samples B rows whose tokens both halves take;
- the random numbers come from one generator seeded with S (the global one's stream, drawn
  from a generator of our own), per AR step: the initial x, then one draw per Euler-Maruyama
  step (:mod:`bitdance_rt.sampling` runs the head sampler);
- the whole batch is decoded at once (the CPU's convolutions round differently for other
  batch sizes), with the autoencoder in channels_last as theirs is. On the CPU the
  GroupNorm of channels_last activations sums in an order that depends on the number of
  threads, so the decoded pixels (not the tokens) are theirs for the same
  ``torch.get_num_threads()`` (with another count, a few values differ by one).

Two ways to run the head, bit-identical on the CPU in float32: ``reference`` evaluates the whole
head network at every sampler step, as the authors do; ``torch`` computes the x-independent part
of the head (time and condition embeddings, every adaLN modulation) once per AR step for all
sampler steps and runs only the x-dependent part per step. Both use the transformer's static KV
cache for all sequences.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..models.posemb import tokens_to_latent
from ..models.steps import tile_rows, to_uint8
from ..sampling import sample_block, sample_block_premodulated, step_schedule
from .checkpoint import ImageNetModel

BACKENDS = ("torch", "reference", "onnxruntime", "tensorrt")
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")  # the export's graphs or engines hold the weights


def guidance_at(guidance: float, k: int, num_blocks: int) -> float:
    """The guidance of AR step ``k`` of ``num_blocks`` (the authors' linear schedule)."""
    if guidance <= 1.0:
        return 1.0
    return 1.0 + (guidance - 1.0) * k / num_blocks


class TorchSteps:
    """The family's steps in PyTorch over the transformer's static KV cache: ``start(rows)``,
    ``first(labels)`` and ``next(tokens, k)`` (the head condition of AR step 0 and k),
    ``sample`` (the head's sampler for one AR step), ``decode``, ``finish``. The graph runner
    (:class:`bitdance_rt.imagenet.graphs.GraphSteps`) has the same calls."""

    def __init__(self, model: ImageNetModel, reference: bool = False,
                 cuda_graphs: bool | None = None, emulate_graphs: bool = False):
        """``cuda_graphs``: replay each AR step's head sampling loop, and each transformer step
        k >= 1, as CUDA graphs (default: on CUDA, torch backend); ``emulate_graphs`` runs that
        code path on the CPU through the graph stand-in
        (:class:`bitdance_rt.runtime.graphs.RecordedGraph`, for tests)."""
        self.model, self.reference = model, reference
        self.name = "reference" if reference else "torch"
        self.net = model.transformer
        on_cuda = model.device.type == "cuda"
        self.emulate = emulate_graphs
        self.graphs = not reference and (emulate_graphs or (on_cuda and cuda_graphs is not False))
        self._loops = {}
        self._steps = {}       # k -> StepGraph, for the cache of ``self._rows`` rows
        self._rows = None      # the rows of the cache the step graphs write into

    def start(self, rows: int) -> None:
        layers = self.net.layers
        if self.graphs and self._rows == rows:
            # the step graphs' own cache (another runner of this model may have set its own
            # since): every position of a run is written before it is read
            for layer, cache in zip(layers, self._caches):
                layer.attention.cache = cache
            return
        self.net.setup_cache(rows)
        self._steps, self._rows = {}, rows if self.graphs else None
        self._caches = [layer.attention.cache for layer in layers] if self.graphs else None

    def first(self, labels: torch.Tensor) -> torch.Tensor:
        return self.net.head_condition(self.net.first_step(labels), 0)

    def next(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        if not self.graphs:
            return self.net.head_condition(self.net.next_step(tokens, k), k)
        if k not in self._steps:  # capturing runs this step (twice: idempotent)
            self._steps[k] = StepGraph(self, tokens, k)
            return self._steps[k].graph.out.clone()
        return self._steps[k](tokens)

    def sample(self, cond, noise, guidance, times, coeffs) -> torch.Tensor:
        head, dtype = self.net.head.net, self.model.dtype
        if self.reference:
            return sample_block(lambda x, t, c: head(x.to(dtype), t, c), cond, noise, guidance,
                                times, coeffs)
        if self.graphs:
            key = (cond.shape[0], noise[0].shape[0], len(noise))
            if key not in self._loops:
                self._loops[key] = HeadLoop(self, cond, noise, times, coeffs)
            return self._loops[key](cond, noise, guidance)
        return sample_block_premodulated(head, cond, noise, guidance, times, coeffs, dtype)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        model, side = self.model, self.model.spec.latent_side
        latent = tokens_to_latent(tokens.float(), side, side, model.spec.patch)
        return to_uint8(model.ae.decode(latent.to(model.dtype)))

    def finish(self) -> None:
        if not self.graphs:
            self.net.clear_cache()  # its memory is not kept between runs
        # with graphs, the cache stays for the next run of as many rows (its captured steps
        # write into it); another row count makes a new cache and new step graphs

    def metering(self, meter):
        """Count into ``meter`` the model calls (a transformer step, a head evaluation, a
        decode) and the weight bytes their modules read, while the block runs. A replayed
        head-loop graph runs no Python: its work is not seen (``generate --timings`` turns the
        graphs off)."""
        from ..runtime.timing import watch_modules

        return watch_modules(meter, (self.net, self.model.ae),
                             (self.net.emb_norm, self.net.head.net.input_proj,
                              self.model.ae.decoder))


class StepGraph:
    """Transformer step ``k`` (k >= 1: the previous step's tokens in, the head condition out)
    as one captured graph: its cache positions, position rows and mask are fixed per k, so
    each k is a graph of its own over the one cache; the tokens are copied into its buffer
    before each replay."""

    def __init__(self, steps: TorchSteps, tokens: torch.Tensor, k: int):
        from ..runtime import graphs

        net = steps.net
        self.tokens = tokens.clone()
        self.graph = graphs.capture(
            lambda: net.head_condition(net.next_step(self.tokens, k), k),
            emulate=steps.emulate, device=None if steps.emulate else tokens.device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.graph.out.clone()


class HeadLoop:
    """The head's whole sampling loop of one AR step (N + 1 evaluations and their updates) as
    one captured graph, per shape (rows, sampled rows, steps). It reads only tensors it owns:
    the condition, the noise and the guidance of the AR step (the linear schedule changes it
    every step) are copied into its buffers before each replay."""

    def __init__(self, steps: TorchSteps, cond, noise, times, coeffs):
        from ..runtime import graphs

        net, dtype = steps.net.head.net, steps.model.dtype
        self.cond = torch.zeros_like(cond)
        self.noise = torch.zeros((len(noise), *noise[0].shape), device=cond.device)
        self.guidance = torch.ones((), device=cond.device)
        self.times, self.coeffs = times.clone(), coeffs.clone()  # read by the graph: owned here
        self.graph = graphs.capture(
            lambda: sample_block_premodulated(net, self.cond, list(self.noise.unbind(0)),
                                              self.guidance, self.times, self.coeffs, dtype),
            emulate=steps.emulate, device=None if steps.emulate else cond.device)

    def __call__(self, cond, noise, guidance: float) -> torch.Tensor:
        self.cond.copy_(cond)
        self.noise.copy_(torch.stack(noise))
        self.guidance.fill_(guidance)
        self.graph.replay()
        return self.graph.out.clone()


def steps_for(model: ImageNetModel, backend: str = "torch", export_dir=None):
    """The runner of ``backend`` for ``model`` (``onnxruntime``: the graphs in ``export_dir``;
    ``tensorrt``: their engines, ``export_dir`` or its ``engines/``; the model may then be
    loaded without weights)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "onnxruntime":
        from .graphs import GraphSteps

        return GraphSteps(model, export_dir)
    if backend == "tensorrt":
        from .graphs import EngineSteps

        return EngineSteps(model, export_dir)
    return TorchSteps(model, reference=backend == "reference")


def _parts(seed, batch: int) -> list[tuple[int, int]]:
    """``(seed, images)`` per request: an int seed is one request of the whole batch."""
    parts = [(int(seed), batch)] if isinstance(seed, int) else [(int(s), int(n)) for s, n in seed]
    if sum(n for _, n in parts) != batch:
        raise ValueError(f"the seeds cover {sum(n for _, n in parts)} images, the labels {batch}")
    return parts


@torch.no_grad()
def generate_tokens(model: ImageNetModel, labels, steps: int, guidance: float, seed,
                    backend="torch",
                    on_step: Callable[[int, int], None] | None = None,
                    timer=None, forced: torch.Tensor | None = None,
                    fed: list | None = None) -> torch.Tensor:
    """The +-1 tokens ``[B, h*w, latent]`` (token order) of ``labels`` (see the module
    docstring). ``seed``: an int, or ``(seed, images)`` per request (consecutive labels): each
    request draws from its own generator exactly what it draws alone. ``backend``: a name of
    ``BACKENDS`` or a runner (:func:`steps_for`). ``timer``: a
    :class:`~bitdance_rt.runtime.timing.StageTimer` whose stages (``prefill``: the class tokens,
    ``block_step``: every later AR step, ``head``) the run is timed in. Teacher forcing (each
    step's prediction from another run's context, what quantization is judged by): ``fed``, a
    list, receives the tokens each step feeds back (every row, ``[rows, P, latent]``);
    ``forced``, their concatenation ``[rows, h*w, latent]`` from another run, is fed back
    instead of the sampled tokens."""
    runner = steps_for(model, backend) if isinstance(backend, str) else backend
    stage = timer.stage if timer is not None else (lambda name: contextlib.nullcontext())
    spec, device = model.spec, model.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    batch = labels.shape[0]
    gens = [(torch.Generator(device).manual_seed(s), n) for s, n in _parts(seed, batch)]
    if guidance > 1.0:
        labels = torch.cat([labels, torch.full_like(labels, spec.num_classes)])
    rows = labels.shape[0]
    times, coeffs = (t.to(device) for t in step_schedule(steps, spec.time_shift))
    shape = (spec.parallel_num, spec.latent_dim)

    def draw(both_halves: bool) -> torch.Tensor:
        """One draw for the sampled rows: per request its images' rows (and, when both
        halves of a guided batch are sampled, its unconditional rows after them)."""
        cond, uncond = [], []
        for g, n in gens:
            t = torch.randn((2 * n if both_halves else n, *shape), generator=g, device=device)
            cond.append(t[:n])
            uncond.append(t[n:])
        return torch.cat(cond + (uncond if both_halves else []))

    runner.start(rows)
    try:
        out, tokens = [], None
        for k in range(spec.num_blocks):
            with stage("prefill" if k == 0 else "block_step"):
                cond = runner.first(labels) if k == 0 else runner.next(tokens, k)
            g = guidance_at(guidance, k, spec.num_blocks)
            both = rows > batch and g <= 1.0  # guided batch, step without guidance
            noise = [draw(both) for _ in range(steps + 1)]
            with stage("head"):
                x = runner.sample(cond, noise, g, times, coeffs)
            tokens = torch.sign(tile_rows(x, rows))
            out.append(tokens[:batch])
            if forced is not None:  # the next step sees the given block instead
                p = spec.parallel_num
                tokens = forced[:, k * p:(k + 1) * p].to(tokens)
            if fed is not None:
                fed.append(tokens)
            if on_step:
                on_step(k + 1, spec.num_blocks)
    finally:
        runner.finish()
    return torch.cat(out, dim=1)


@torch.no_grad()
def decode(model: ImageNetModel, tokens: torch.Tensor, runner=None, counts=None,
           timer=None) -> torch.Tensor:
    """+-1 tokens ``[B, h*w, latent]`` -> uint8 images ``[B, H, W, 3]``, each request's images
    (``counts``; default: one request) decoded as one batch, as it is decoded alone."""
    runner = runner or TorchSteps(model)
    counts = counts or [tokens.shape[0]]
    parts, i = [], 0
    for n in counts:
        with (timer.stage("decode") if timer is not None else contextlib.nullcontext()):
            parts.append(runner.decode(tokens[i:i + n]))
        i += n
    return torch.cat(parts)


def generate(model: ImageNetModel, labels, steps: int, guidance: float, seed,
             backend="torch", on_step=None, timer=None) -> torch.Tensor:
    """uint8 images ``[B, H, W, 3]`` of ``labels`` (see the module docstring); ``seed`` and
    ``backend`` as in :func:`generate_tokens`."""
    runner = steps_for(model, backend) if isinstance(backend, str) else backend
    metering = runner.metering(timer.meter) if timer is not None else contextlib.nullcontext()
    with metering:
        if timer is not None:
            timer.start()
        tokens = generate_tokens(model, labels, steps, guidance, seed, runner, on_step, timer)
        counts = None if isinstance(seed, int) else [int(n) for _, n in seed]
        images = decode(model, tokens, runner, counts, timer)
        if timer is not None:
            timer.stop()
    return images
