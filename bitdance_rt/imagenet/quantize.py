"""``bitdance-export quantize`` of a converted ImageNet-family directory (the recipes' arithmetic
and layout are :mod:`bitdance_rt.calibration.quantize`'s; the gate is :mod:`.quality`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..calibration.quantize import (convert_file, file_float_dtype, quantized_files,
                                    write_layout)
from ..calibration.recipes import HEAD, TRANSFORMER, get_recipe, quantized_names
from ..checkpoint import weights_fingerprint
from ..errors import BitDanceError
from ..files import check_output_dir, staged_directory
from ..models.quant import LAYOUT_FILE, read_layout
from .checkpoint import MODEL_FILE, read_info, weight_files
from .transformer import ClassConditionalTransformer


def quantize(ckpt_dir, recipe_name: str, out_dir,
             progress: Callable[[str], None] | None = None) -> dict:
    """The ``recipe_name`` quantization of a converted ImageNet-family directory: its
    transformer's and head's layers of :data:`~bitdance_rt.calibration.recipes.LAYER_RULES` in ``model.safetensors``,
    the autoencoder and ``bitdance_rt.json`` copied, ``quantization.json`` beside them.
    Weight-only recipes: the activation recipes' statistics come from text prompts
    (``calibrate``), which this family does not take."""
    recipe = get_recipe(recipe_name)
    src, out = Path(ckpt_dir), Path(out_dir)
    spec, _ = read_info(src)
    if read_layout(src) is not None:
        raise BitDanceError(f"{src} is already quantized; quantize the float checkpoint it was "
                            "made from")
    if recipe.needs_calibration:
        raise BitDanceError(f"recipe {recipe.name} quantizes activations with statistics that "
                            "`bitdance-export calibrate` collects over text prompts; for the "
                            "class-conditional ImageNet family use fp8-weight or int8-weight")
    if out.resolve() == src.resolve():
        raise BitDanceError("--out must be another directory than --checkpoint")
    files = weight_files(src)
    check_output_dir(out, "quantized checkpoint", LAYOUT_FILE, quantized_files,
                     size=sum(f.stat().st_size for f in files if f.is_file()))
    say = progress or (lambda line: None)
    with torch.device("meta"):
        transformer = ClassConditionalTransformer(spec)
    names = {TRANSFORMER: set(quantized_names(TRANSFORMER, transformer)),
             HEAD: set(quantized_names(HEAD, transformer.head))}
    in_file = names[TRANSFORMER] | {f"head.{n}" for n in names[HEAD]}
    model_file = src / MODEL_FILE
    t0 = time.perf_counter()
    with staged_directory(out, quantized_files, "quantized checkpoint") as stage:
        convert_file(model_file, stage / model_file.name, in_file, recipe, None, TRANSFORMER,
                     file_float_dtype(model_file, torch.float32))
        say(f"{model_file.name}: quantized")
        for item in sorted(src.iterdir()):  # the autoencoder, bitdance_rt.json
            if item.name != model_file.name and item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, stage / item.name)
        layout = write_layout(stage, recipe, src, weights_fingerprint(src, files=files),
                              spec.config_hash(), None, names)
    say(f"wrote {out} ({recipe.name}) in {time.perf_counter() - t0:.1f}s")
    return layout
