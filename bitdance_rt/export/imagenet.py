"""The class-conditional family's graphs (``bitdance-export --checkpoint DIR`` of a converted
ImageNet model): the same ``head_prepare``, ``head_step`` and ``decoder`` graphs as the
text-to-image models (the same wrapper modules over the family's head and autoencoder), and two
transformer graphs in the ``standard`` form (they return the keys and values of their new
positions; the runtime keeps the cache):

``first_step``
  labels  ``[R]`` int64                     class indices (the null class for guidance rows)
  ->  cond ``[R, p, dim]``                  the head condition of AR step 0
      keys, values ``[L, R, H, t0, 64]``    t0 = class tokens + p - 1
``next_step``
  tokens  ``[R, p, 32]`` float32            the +-1 tokens of the previous AR step
  past_keys, past_values ``[L, R, H, past, 64]``   every earlier position (``past`` dynamic)
  ->  cond ``[R, p, dim]``, keys, values ``[L, R, H, p, 64]``

Both call the transformer's own methods (``first_step``, ``next_step``, ``head_condition``),
the AR step's position taken from the length of the past (symbolic in the graph).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .. import dtypes
from ..errors import BitDanceError
from ..files import staged_directory
from ..manifest import export_files, tool_versions, write_manifest
from . import qdq
from .common import OPSET, GraphDef, check_out_dir, dim, export_dtype, write_graphs
from .decoder import DecoderGraph
from .head_prepare import HeadPrepare
from .head_step import HeadStep

from ..manifest import IMAGENET_GRAPHS as GRAPHS
DEFAULT_MAX_BATCH = 256  # `bitdance-rt sample`'s default batch


class _ConcatCache:
    """A layer's cache during a graph call: the past (or nothing), with the new positions
    appended; the new keys and values are kept for the graph's outputs."""

    def __init__(self, past_k=None, past_v=None):
        self.past = (past_k, past_v)
        self.new = None

    def update(self, start, k, v):
        self.new = (k, v)
        if self.past[0] is None:
            return k, v
        return torch.cat([self.past[0], k], dim=2), torch.cat([self.past[1], v], dim=2)


def _with_caches(net, caches):
    for layer, cache in zip(net.layers, caches):
        layer.attention.cache = cache


def _new_kv(caches):
    return (torch.stack([c.new[0] for c in caches]), torch.stack([c.new[1] for c in caches]))


class FirstStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.transformer

    def forward(self, labels):
        caches = [_ConcatCache() for _ in self.net.layers]
        _with_caches(self.net, caches)
        try:
            cond = self.net.head_condition(self.net.first_step(labels), 0)
        finally:
            self.net.clear_cache()
        return (cond, *_new_kv(caches))


class NextStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.net = model.transformer

    def forward(self, tokens, past_keys, past_values):
        spec = self.net.spec
        caches = [_ConcatCache(past_keys[i], past_values[i]) for i in range(len(self.net.layers))]
        _with_caches(self.net, caches)
        try:
            start = past_keys.shape[3]
            hidden = self.net.run(self.net.proj_in(tokens.to(self.net.norm.weight.dtype)), start)
            p = spec.parallel_num
            pos = start - spec.cls_token_num + 1  # = k p for AR step k
            cond = hidden + self.net.pos_for_diff.weight[pos:pos + p]
        finally:
            self.net.clear_cache()
        return (cond, *_new_kv(caches))


def head_model(model) -> SimpleNamespace:
    """What the shared head and decoder wrappers read of a model: its head, autoencoder and
    dtype."""
    return SimpleNamespace(head=model.transformer.head, ae=model.ae, dtype=model.dtype)


def first_len(spec) -> int:
    return spec.cls_token_num + spec.parallel_num - 1


def graph_defs(model, batch: int = 2) -> dict:
    from ..sampling import head_modulations, step_schedule

    spec = model.spec
    gen = torch.Generator().manual_seed(0)
    rows, p, L, H = 2 * batch, spec.parallel_num, spec.n_layer, spec.n_head
    past = first_len(spec) + p  # an example past of two AR steps
    past_dim = dim("past", first_len(spec), spec.max_len - p - 1)
    R, B, S = dim("rows"), dim("batch"), dim("rows")
    kv = (L, rows, H, past, 64)
    hm = head_model(model)
    times, coeffs = step_schedule(6, spec.time_shift)
    cond = torch.randn(rows, p, spec.dim, generator=gen)
    with torch.no_grad():
        ada, final = head_modulations(hm.head.net, cond, times[1:2], model.dtype)
    side = spec.latent_side
    return {
        "first_step": lambda: GraphDef(
            "first_step", FirstStep(model), {"labels": torch.arange(rows) % spec.num_classes},
            {"labels": {0: R}}, ["cond", "keys", "values"]),
        "next_step": lambda: GraphDef(
            "next_step", NextStep(model),
            {"tokens": torch.randint(0, 2, (rows, p, spec.latent_dim), generator=gen).float() * 2 - 1,
             "past_keys": torch.randn(kv, generator=gen).to(model.dtype),
             "past_values": torch.randn(kv, generator=gen).to(model.dtype)},
            {"tokens": {0: R}, "past_keys": {1: R, 3: past_dim},
             "past_values": {1: R, 3: past_dim}},
            ["cond", "keys", "values"]),
        "head_prepare": lambda: GraphDef(
            "head_prepare", HeadPrepare(hm), {"cond": cond, "times": times},
            {"cond": {0: S}, "times": {0: dim("steps")}}, ["ada_mod", "final_mod"]),
        "head_step": lambda: GraphDef(
            "head_step", HeadStep(hm),
            {"x": torch.randn(batch, p, spec.latent_dim, generator=gen), "coeffs": coeffs[1],
             "noise": torch.randn(batch, p, spec.latent_dim, generator=gen),
             "ada_mod": torch.stack(ada, dim=1)[0], "final_mod": final[0],
             "guidance": torch.tensor([3.0])},
            {"x": {0: B}, "coeffs": None, "noise": {0: B}, "ada_mod": {1: S},
             "final_mod": {0: S}, "guidance": None}, ["x_next"]),
        "decoder": lambda: GraphDef(
            "decoder", DecoderGraph(hm),
            {"latent": torch.randint(0, 2, (2, spec.latent_dim, side, side),
                                     generator=gen).float() * 2 - 1},
            {"latent": {0: B}}, ["image"]),
    }


def export_writes() -> set:
    from ..manifest import MANIFEST

    return {MANIFEST} | {f"{g}.onnx" for g in GRAPHS} | {f"{g}.onnx.data" for g in GRAPHS}


def export_size(ckpt: Path, dtype: torch.dtype) -> int:
    """About the bytes an export writes: the weights (stored in float32) in ``dtype``."""
    from ..imagenet.checkpoint import weight_files

    stored = sum(f.stat().st_size for f in weight_files(ckpt) if f.is_file())
    return stored * torch.empty((), dtype=dtype).element_size() // 4


def export_checkpoint(checkpoint, out_dir, *, dtype: str = "fp32",
                      max_batch: int = DEFAULT_MAX_BATCH,
                      progress: Callable[[str], None] | None = None,
                      finish: Callable[[Path], None] | None = None) -> dict:
    """Load a converted ImageNet checkpoint in ``dtype`` and write its graphs and manifest
    into ``out_dir`` (staged: replaced only when complete; a directory of other files is
    refused). Every setting is checked before the weights load."""
    from ..checkpoint import weights_fingerprint
    from ..imagenet import checkpoint as imagenet_checkpoint
    from ..imagenet.checkpoint import weight_files

    ckpt = Path(checkpoint)
    torch_dtype = export_dtype(dtype)
    if not 1 <= max_batch <= 4096:
        raise BitDanceError(f"--max-batch {max_batch}: pass 1 to 4096 images per call")
    configs = imagenet_checkpoint.load(ckpt, weights=False)
    out = Path(out_dir)
    from ..manifest import ENGINES_SUBDIR

    writes = export_writes() | ({ENGINES_SUBDIR} if finish else set())
    check_out_dir(out, owned=export_files, writes=writes,
                  size=export_size(ckpt, torch_dtype) * (2 if finish else 1))
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    model = imagenet_checkpoint.load(ckpt, torch_dtype, "cpu")
    say(f"loaded {ckpt} ({configs.name}, {dtype}) in {time.perf_counter() - t0:.1f}s")
    spec = model.spec
    with torch.no_grad(), staged_directory(out, export_files, "export") as stage:
        opset = qdq.required_opset(model, OPSET)  # 19 for a quantized checkpoint's Q/DQ
        written = write_graphs(graph_defs(model), GRAPHS, stage, opset,
                               qdq.onnx_translation_table(), say)
        manifest = {
            "family": "imagenet",
            "preset": configs.name,
            "config_hash": spec.config_hash(),
            "weights_fingerprint": weights_fingerprint(ckpt, files=weight_files(ckpt)),
            "parallel_num": spec.parallel_num,
            "dtype": dtypes.short_name(torch_dtype),
            "opset": opset,
            "attention": "standard",
            "quantization": sorted(qdq.quantized_formats(model)) or None,
            "limits": {"max_batch": max_batch, "max_rows": 2 * max_batch,
                       "max_seq": spec.max_len},
            # the next_step graph's past lengths (the engines' profile)
            "past_range": [first_len(spec), spec.max_len - spec.parallel_num - 1],
            "sizes": [[spec.image_size, spec.image_size]],
            "default_size": [spec.image_size, spec.image_size],
            "source": {"checkpoint": str(ckpt.resolve())},
            "tools": tool_versions(),
            "graphs": written,
        }
        write_manifest(stage, manifest)
        if finish is not None:
            finish(stage)
    return manifest


# -- bitdance-export check: each graph against the runtime's PyTorch code ----------------------


def load_for_check(ckpt, dtype: torch.dtype):
    from ..imagenet import checkpoint as imagenet_checkpoint

    return imagenet_checkpoint.load(ckpt, dtype, "cpu")


def _steps_outputs(model, rows: int, run) -> dict:
    """``run(net)`` on the transformer's static cache; the condition and the keys and values
    it wrote (between the cache lengths before and after)."""
    net = model.transformer
    net.setup_cache(rows)
    try:
        cond, start, end = run(net)
        caches = [layer.attention.cache for layer in net.layers]
        return {"cond": cond, "keys": torch.stack([c.k[:, :, start:end] for c in caches]),
                "values": torch.stack([c.v[:, :, start:end] for c in caches])}
    finally:
        net.clear_cache()


@torch.no_grad()
def _first_step_outputs(model, feeds: dict) -> dict:
    labels = feeds["labels"]
    return _steps_outputs(model, labels.shape[0], lambda net: (
        net.head_condition(net.first_step(labels), 0), 0, first_len(model.spec)))


@torch.no_grad()
def _next_step_outputs(model, feeds: dict) -> dict:
    spec, past = model.spec, feeds["past_keys"].shape[3]
    k = (past - first_len(spec)) // spec.parallel_num + 1

    def run(net):
        for i, layer in enumerate(net.layers):
            layer.attention.cache.k[:, :, :past] = feeds["past_keys"][i]
            layer.attention.cache.v[:, :, :past] = feeds["past_values"][i]
        return (net.head_condition(net.next_step(feeds["tokens"], k), k), past,
                past + spec.parallel_num)
    return _steps_outputs(model, feeds["tokens"].shape[0], run)


def _shared(module):
    return lambda model, feeds: module.pytorch_outputs(head_model(model), feeds)


def pytorch_outputs() -> dict:
    from . import decoder, head_prepare, head_step

    return {"first_step": _first_step_outputs, "next_step": _next_step_outputs,
            "head_prepare": _shared(head_prepare), "head_step": _shared(head_step),
            "decoder": _shared(decoder)}


def check_cases(model, gen: torch.Generator) -> dict:
    """Fresh random inputs per graph: with and without guidance, early and late AR steps, an
    Euler-Maruyama and the final sampler step."""
    from ..sampling import head_modulations, step_schedule

    spec = model.spec
    p, L, H = spec.parallel_num, spec.n_layer, spec.n_head

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def labels(rows):
        return torch.randint(0, spec.num_classes + 1, (rows,), generator=gen)

    def next_feeds(rows, j):
        past = first_len(spec) + p * j
        kv = (L, rows, H, past, 64)
        return {"tokens": torch.randint(0, 2, (rows, p, spec.latent_dim), generator=gen).float()
                * 2 - 1, "past_keys": torch.randn(kv, generator=gen).to(model.dtype),
                "past_values": torch.randn(kv, generator=gen).to(model.dtype)}

    def head_feeds(batch, guided, final):
        times, coeffs = step_schedule(6, spec.time_shift)
        k = 6 if final else ri(0, 5)
        rows = 2 * batch if guided else batch
        cond = torch.randn(rows, p, spec.dim, generator=gen)
        ada, final_mod = head_modulations(model.transformer.head.net, cond, times[k:k + 1],
                                          model.dtype)
        return {"x": torch.randn(batch, p, spec.latent_dim, generator=gen), "coeffs": coeffs[k],
                "noise": torch.randn(batch, p, spec.latent_dim, generator=gen),
                "ada_mod": torch.stack(ada, dim=1)[0], "final_mod": final_mod[0],
                "guidance": torch.tensor([3.5 if guided else 1.0])}

    def prepare_feeds(rows, n):
        return {"cond": torch.randn(rows, p, spec.dim, generator=gen),
                "times": step_schedule(n, spec.time_shift)[0]}

    side = spec.latent_side
    last = spec.num_blocks - 2
    with torch.no_grad():
        return {
            "first_step": [("cfg", {"labels": labels(4)}), ("no-cfg", {"labels": labels(1)})],
            "next_step": [(f"cfg,step {j + 1}", next_feeds(4, j)) for j in (0, ri(1, last))]
            + [("no-cfg,last", next_feeds(1, last))],
            "head_prepare": [("cfg,N=6", prepare_feeds(4, 6)), ("no-cfg,N=1", prepare_feeds(1, 1))],
            "head_step": [("cfg,em", head_feeds(2, True, False)),
                          ("no-cfg,final", head_feeds(1, False, True))],
            "decoder": [("1 image", {"latent": torch.randint(0, 2, (1, spec.latent_dim, side, side),
                                                             generator=gen).float() * 2 - 1})],
        }
