"""``bitdance-export quantize``: a float checkpoint to a quantized one, tensor by tensor.

The output directory is a checkpoint in the released layout: the same files, the quantized
layers' weights stored as E4M3 or int8 codes with their scales beside them (the keys of
:class:`~bitdance_rt.models.quant.QuantLinear`), every other tensor unchanged, and
``quantization.json`` naming the recipe and each quantized module. ``load_checkpoint`` (and so
``bitdance-rt generate``) reads it like any checkpoint.

The conversion streams the weight files one tensor at a time (a 14B checkpoint needs no more
memory than its largest shard), and the directory is written under a temporary name and
renamed into place when complete.

Scales are rounded to bfloat16-representable values (upwards, so no weight saturates): a
quantized checkpoint then loads in float32, bfloat16 or float16 with exactly the same scales.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BitDanceError, CheckpointError
from ..files import check_output_dir, is_plain_name, read_json, staged_directory
from ..models.quant import FORMATS, LAYOUT_FILE, LAYOUT_FORMAT, read_layout, quantize_codes
from .recipes import HEAD, LLM, TRANSFORMER, Recipe, get_recipe, quantized_names
from .stats import Calibration

HEAD_FILE = "vision_head.safetensors"


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16-representable value >= x (float32 in, float32 out; x >= 0)."""
    b = x.float().to(torch.bfloat16)
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 up (x >= 0)
    return torch.where(b.float() < x, up, b).float()


def smoothing(channel_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``pre_quant_scale`` ``1/s`` per input channel, with
    ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (bfloat16-representable); channels that
    are never active or have no weight keep 1."""
    a = channel_max.float()
    w = weight.float().abs().amax(dim=0)
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)
    return (1.0 / s).to(torch.bfloat16).float()


def quantize_linear(weight: torch.Tensor, recipe: Recipe, stats=None) -> dict:
    """One Linear layer's tensors under ``recipe``: ``weight`` (codes), ``weight_scale``
    ``[N]``, and with the recipe's activation handling ``input_scale`` (0-d) and
    ``pre_quant_scale`` ``[K]``. ``stats`` = (amax, channel_max) of the layer's input
    (needed by recipes with static activations)."""
    w = weight.float()
    out = {}
    if recipe.needs_calibration and stats is None:
        raise BitDanceError(f"recipe {recipe.name} needs activation statistics")
    if recipe.smooth:
        pqs = smoothing(stats[1], w, recipe.alpha)
        w = w / pqs[None, :]
        out["pre_quant_scale"] = pqs
    dtype, qmax = FORMATS[recipe.fmt]
    row_max = w.abs().amax(dim=1)
    scale = bf16_ceil(torch.where(row_max > 0, row_max / qmax, torch.ones_like(row_max)))
    if recipe.fmt == "int8":
        codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    else:
        codes = quantize_codes(w, scale[:, None], "fp8")
    out["weight"], out["weight_scale"] = codes, scale
    if recipe.activation == "static":
        amax = float(stats[0]) if not recipe.smooth else float((stats[1].float() * pqs).max())
        out["input_scale"] = bf16_ceil(torch.tensor(amax / qmax if amax > 0 else 1.0))
    return out


def module_entry(recipe: Recipe) -> dict:
    return {"format": recipe.fmt, "activation": recipe.activation, "smooth": recipe.smooth}


def convert_file(src: Path, dst: Path, names: set, recipe: Recipe, calib, component: str,
                  float_dtype) -> dict:
    """Write ``dst`` from ``src``: the weights of ``names`` quantized, the rest copied (every
    tensor checked for NaN and infinity first); returns key -> file name of what was written."""
    from safetensors.torch import save_file

    from ..checkpoint import check_finite, open_safetensors

    tensors = {}
    with open_safetensors(src) as f:
        keys = list(f.keys())
        for k in keys:
            name, _, leaf = k.rpartition(".")
            tensor = f.get_tensor(k)
            check_finite(tensor, k, src)
            if name in names and leaf == "weight":
                stats = calib.layer(component, name) if recipe.needs_calibration else None
                for key, t in quantize_linear(tensor, recipe, stats).items():
                    keep = t.dtype in (torch.int8, torch.float8_e4m3fn)
                    tensors[f"{name}.{key}"] = (t if keep else t.to(float_dtype)).contiguous()
            else:
                tensors[k] = tensor.contiguous()
    save_file(tensors, str(dst), metadata={"format": "pt"})
    return {k: dst.name for k in tensors}


def quantize_checkpoint(ckpt_dir, recipe_name: str, out_dir, calibration=None,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Write the ``recipe_name`` quantization of the float checkpoint ``ckpt_dir`` to
    ``out_dir``; returns the layout written (``quantization.json``)."""
    from ..checkpoint import _llm_files, read_spec, weights_fingerprint, weights_size
    from ..models.head import DiffusionHead
    from ..models.qwen3 import Qwen3ForCausalLM

    recipe = get_recipe(recipe_name)
    src, out = Path(ckpt_dir), Path(out_dir)
    spec = read_spec(src)  # checks the configs
    if read_layout(src) is not None:
        raise BitDanceError(f"{src} is already quantized; quantize the float checkpoint it was "
                            "made from")
    if out.resolve() == src.resolve():
        raise BitDanceError("--out must be another directory than --checkpoint")
    calib = None
    if calibration is not None:
        calib = calibration if isinstance(calibration, Calibration) else Calibration.load(
            calibration)
        calib.check_checkpoint(src)
    elif recipe.needs_calibration:
        raise BitDanceError(f"recipe {recipe.name} quantizes activations with calibrated "
                            "scales: pass --calibration FILE (from `bitdance-export "
                            f"calibrate --checkpoint {src} --out FILE`)")
    check_output_dir(out, "quantized checkpoint", LAYOUT_FILE, quantized_files,
                     size=weights_size(src))
    say = progress or (lambda line: None)
    with torch.device("meta"):
        names = {LLM: set(quantized_names(LLM, Qwen3ForCausalLM(spec.llm))),
                 HEAD: set(quantized_names(HEAD, DiffusionHead(spec.head)))}
    llm_files = sorted(set(_llm_files(src).values()))
    float_dtype = torch.bfloat16  # the released dtype of every float tensor
    t0 = time.perf_counter()
    with staged_directory(out, quantized_files, "quantized checkpoint") as stage:
        weight_map = {}
        for f in llm_files:
            weight_map.update(convert_file(f, stage / f.name, names[LLM], recipe, calib, LLM,
                                            file_float_dtype(f, float_dtype)))
            say(f"{f.name}: quantized")
        index = src / "model.safetensors.index.json"
        if index.is_file():
            data = read_json(index, "", error=CheckpointError, fix="download it again")
            data["weight_map"] = dict(sorted(weight_map.items()))
            data.setdefault("metadata", {})["total_size"] = sum(
                (stage / f).stat().st_size for f in set(weight_map.values()))
            (stage / index.name).write_text(json.dumps(data, indent=2))
        convert_file(src / HEAD_FILE, stage / HEAD_FILE, names[HEAD], recipe, calib, HEAD,
                      file_float_dtype(src / HEAD_FILE, float_dtype))
        say(f"{HEAD_FILE}: quantized")
        written = set(weight_map.values()) | {HEAD_FILE, index.name}
        for item in sorted(src.iterdir()):  # configs, tokenizer, autoencoder, projector
            if item.name not in written and item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, stage / item.name)
        calibration_entry = None if calib is None else {
            **{k: calib.meta.get(k) for k in ("prompts_sha256", "samples", "steps", "height",
                                              "width", "guidance", "seed", "created")},
            "sha256": calib.sha256}  # the file's content hash, verified when it was read
        layout = write_layout(stage, recipe, src, weights_fingerprint(src), spec.config_hash(),
                              calibration_entry, names)
    say(f"wrote {out} ({recipe.name}) in {time.perf_counter() - t0:.1f}s")
    return layout


def write_layout(stage: Path, recipe: Recipe, src: Path, fingerprint: str, config_hash: str,
                 calibration: dict | None, names: dict) -> dict:
    """Write ``quantization.json`` into ``stage`` (the other files already there): the recipe,
    the float checkpoint it came from, the calibration used and every quantized module per
    component; returns it."""
    layout = {
        "format": LAYOUT_FORMAT, "recipe": recipe.name, "summary": recipe.summary,
        "source": {"path": str(src.resolve()), "weights_fingerprint": fingerprint,
                   "config_hash": config_hash},
        "calibration": calibration,
        "modules": {comp: {n: module_entry(recipe) for n in sorted(ns)}
                    for comp, ns in names.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # every file written, so that replacing this output later keeps anything else
    layout["files"] = sorted({p.name for p in stage.iterdir()} | {LAYOUT_FILE})
    (stage / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
    return layout


def quantized_files(d: Path, writes=frozenset()) -> set:
    """The entries of a quantized checkpoint that ``quantize`` wrote (its layout lists them;
    one written before the list was kept: every visible file). A layout that cannot be read
    owns nothing."""
    from ..files import read_json as read

    try:
        layout = read(Path(d) / LAYOUT_FILE, error=BitDanceError)
    except BitDanceError:
        return set()
    files = layout.get("files")
    if isinstance(files, list):
        return {LAYOUT_FILE} | {f for f in files if is_plain_name(f) and "/" not in f}
    return {p.name for p in Path(d).iterdir() if p.is_file() and not p.is_symlink()
            and not p.name.startswith(".")}


def file_float_dtype(path: Path, default):
    """The float dtype a file stores its weights in (scales are written in the same dtype;
    the released files are bfloat16, make-tiny's float32)."""
    from ..checkpoint import open_safetensors

    with open_safetensors(path) as f:
        for k in f.keys():
            t = f.get_slice(k).get_dtype()
            return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
                t, default)
    return default


def model_parts(model) -> list[tuple[str, nn.Module]]:
    """(component, module) of every part a recipe quantizes: a text-to-image model's LLM and
    head, or an ImageNet model's transformer and its head."""
    if getattr(model, "transformer", None) is not None:
        return [(TRANSFORMER, model.transformer), (HEAD, model.transformer.head)]
    return [(LLM, model.llm), (HEAD, model.head)]


@torch.no_grad()
def quantize_model(model, recipe_name: str, calibration: Calibration | None = None,
                   placeholder_stats: bool = False):
    """Quantize a loaded model in place, on its device (benchmarks of random-weight presets,
    which have no checkpoint directory to convert). The same layers and arithmetic as
    :func:`quantize_checkpoint`. A recipe with static activations needs ``calibration``, or
    ``placeholder_stats`` (every input maximum taken as 8: for timing only, the images are
    meaningless)."""
    from ..models.quant import QuantLinear

    recipe = get_recipe(recipe_name)
    if recipe.needs_calibration and calibration is None and not placeholder_stats:
        raise BitDanceError(f"recipe {recipe.name} needs calibration statistics")
    for component, module in model_parts(model):
        for name in quantized_names(component, module):
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            lin = getattr(parent, leaf)
            stats = None
            if recipe.needs_calibration:
                stats = (calibration.layer(component, name) if calibration is not None else
                         (8.0, torch.full((lin.in_features,), 8.0)))
                stats = (stats[0], stats[1].to(lin.weight.device))
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None,
                            recipe.fmt, recipe.activation, recipe.smooth,
                            dtype=model.dtype, device=lin.weight.device)
            state = quantize_linear(lin.weight, recipe, stats)
            if lin.bias is not None:
                state["bias"] = lin.bias
            q.load_state_dict({k: v if k == "weight" else v.to(model.dtype)
                               for k, v in state.items()})
            setattr(parent, leaf, q.eval())
            del lin
    return model
