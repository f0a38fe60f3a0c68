"""Where an export's model comes from: a checkpoint directory (optionally with the LLM truncated
to its first K layers, loading only those layers' weights) and which preset it is."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ..checkpoint import (BitDanceModel, ModelSpec, PRESETS, _llm_files, _load_tensors,
                          _module_files, _on_meta, load_checkpoint, load_tokenizer, preset,
                          read_spec)
from ..errors import BitDanceError
from ..models.autoencoder import BinaryAutoencoder
from ..models.head import DiffusionHead
from ..models.projector import Projector
from ..models.qwen3 import Qwen3ForCausalLM, rope_inv_freq

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _shape_key(spec: ModelSpec) -> tuple:
    """What makes two specs the same model, the vocabulary size aside (a released checkpoint's
    config.json has the Qwen3 vocabulary plus BitDance's added tokens)."""
    llm = dataclasses.replace(spec.llm, vocab_size=0, max_position_embeddings=0)
    ae = dataclasses.replace(spec.ae, gan_decoder=False, extra={})
    return (llm, spec.head, ae)


def known_specs() -> dict[str, ModelSpec]:
    from ..checkpoint import _preset_tiny

    specs = {name: preset(name) for name in PRESETS}
    specs.update({f"tiny-{p}x": _preset_tiny(p) for p in (4, 16, 64)})
    return specs


def identify_preset(spec: ModelSpec) -> str | None:
    """The preset name whose shapes ``spec`` has (canonical names first), or None."""
    key = _shape_key(spec)
    order = ["14b-64x", "14b-16x", "mid", "tiny-4x", "tiny-16x", "tiny-64x"]
    specs = known_specs()
    for name in order + [n for n in specs if n not in order]:
        if _shape_key(specs[name]) == key:
            return name
    return None


def resolve_preset(spec: ModelSpec, model_name: str | None, where) -> str:
    """The preset of the checkpoint; ``--model`` must agree with its configs when given."""
    found = identify_preset(spec)
    if model_name is None:
        return found or "custom"
    want = preset(model_name)  # raises on unknown names
    if _shape_key(want) != _shape_key(spec):
        raise BitDanceError(
            f"--model {model_name} does not match the checkpoint at {where}, whose configs "
            f"describe {found or 'another model'}; drop --model or pass the right checkpoint")
    return "14b-64x" if model_name == "14b" else model_name


def truncate_spec(spec: ModelSpec, num_layers: int | None) -> ModelSpec:
    total = spec.llm.num_hidden_layers
    if num_layers is None or num_layers == total:
        return spec
    if not 1 <= num_layers <= total:
        raise BitDanceError(f"--num-layers must be between 1 and {total}, got {num_layers}")
    llm = dataclasses.replace(spec.llm, num_hidden_layers=num_layers)
    return dataclasses.replace(spec, llm=llm)


def load_for_export(ckpt_dir, dtype: torch.dtype, num_layers: int | None = None) -> BitDanceModel:
    """The checkpoint in ``dtype`` on the CPU; with ``num_layers`` only the first K LLM layers
    are read (a full-width test export of a 14B checkpoint then fits in a small machine)."""
    d = Path(ckpt_dir)
    spec = read_spec(d)
    small = truncate_spec(spec, num_layers)
    if small is spec:
        return load_checkpoint(d, dtype=dtype)
    files = {k: f for k, f in _llm_files(d).items()
             if not (m := _LAYER_KEY.match(k)) or int(m.group(1)) < num_layers}
    llm = _on_meta(lambda: Qwen3ForCausalLM(small.llm))
    _load_tensors(files, llm, dtype, torch.device("cpu"), "language model")
    llm.model.register_buffer("inv_freq", rope_inv_freq(small.llm.head_dim, small.llm.rope_theta),
                              persistent=False)
    head = _on_meta(lambda: DiffusionHead(small.head))
    _load_tensors(_module_files(d / "vision_head.safetensors"), head, dtype, "cpu",
                  "diffusion head")
    proj = _on_meta(lambda: Projector(small.ae.z_channels, small.llm.hidden_size))
    _load_tensors(_module_files(d / "projector.safetensors"), proj, dtype, "cpu", "projector")
    ae = _on_meta(lambda: BinaryAutoencoder(small.ae))
    ae.encoder = None
    ae_files = {k: f for k, f in _module_files(d / "ae.safetensors").items()
                if not k.startswith("encoder.")}
    _load_tensors(ae_files, ae, dtype, "cpu", "autoencoder")
    for m in (llm, head, ae, proj):
        m.eval().requires_grad_(False)
    return BitDanceModel(small, llm, head, ae, proj, load_tokenizer(d), dtype,
                         torch.device("cpu"), d, extras={"full_spec": spec})
