"""Checkpoint directories in the released layout (SPEC section 1): presets, loading, tokenizer.

A checkpoint directory holds ``config.json`` + ``model*.safetensors`` (the Qwen3 LLM),
``tokenizer.json``, ``ae_config.json`` + ``ae.safetensors``, ``vision_head_config.json`` +
``vision_head.safetensors`` and ``projector.safetensors``. Loading checks keys and shapes
strictly and names the file and key of any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .models.autoencoder import AEConfig, BinaryAutoencoder
from .models.head import DiffusionHead, HeadConfig
from .models.projector import Projector
from .models.qwen3 import Qwen3Config, Qwen3ForCausalLM, rope_inv_freq

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

QWEN3_VOCAB = 151936


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of a whole BitDance model (all four parts)."""

    name: str
    llm: Qwen3Config
    head: HeadConfig
    ae: AEConfig

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def patch(self) -> int:
        return int(round(self.head.parallel_num ** 0.5))

    def config_hash(self) -> str:
        """A short hash of the shapes and settings; ties exported artifacts to a model."""
        blob = json.dumps(
            {"llm": self.llm.to_hf_dict(), "head": self.head.to_dict(),
             "ae": self.ae.to_json_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _preset_14b(parallel_num: int) -> ModelSpec:
    llm = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=5120, intermediate_size=17408,
                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                      head_dim=128)
    head = HeadConfig(ch_target=32, ch_cond=5120, ch_latent=5120, depth_latent=6,
                      depth_adanln=2, use_swiglu=True, parallel_num=parallel_num)
    return ModelSpec(f"14b-{parallel_num}x", llm, head, AEConfig())


def _preset_tiny(parallel_num: int) -> ModelSpec:
    from .tiny import TINY_VOCAB

    llm = Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=8192)
    head = HeadConfig(ch_target=32, ch_cond=128, ch_latent=128, depth_latent=2,
                      depth_adanln=2, use_swiglu=True, parallel_num=parallel_num)
    ae = AEConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
    return ModelSpec(f"tiny-{parallel_num}x", llm, head, ae)


def _preset_mid(parallel_num: int) -> ModelSpec:
    """Sized for CPU benchmarks: LLM 512 x 4 layers, head 512 x 2 blocks, P 16.

    The MLP is 8x the width so that, as in the 14B model, attention over a full-size cache is a
    small part of a block step (512x512 image: 15% of the LLM FLOPs at the last block; 14B at
    1024x1024: 13%); a narrower MLP would make a CPU benchmark mostly measure attention."""
    from .tiny import TINY_VOCAB

    llm = Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=512, intermediate_size=4096,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=8192)
    head = HeadConfig(ch_target=32, ch_cond=512, ch_latent=512, depth_latent=2,
                      depth_adanln=1, use_swiglu=True, parallel_num=parallel_num)
    ae = AEConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
    return ModelSpec(f"mid-{parallel_num}x", llm, head, ae)


PRESETS = {
    "14b-64x": lambda: _preset_14b(64),
    "14b-16x": lambda: _preset_14b(16),
    "14b": lambda: _preset_14b(64),
    "mid": lambda: _preset_mid(16),
    "tiny": lambda: _preset_tiny(4),
}


def preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise CheckpointError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Reading a directory


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_spec(ckpt_dir: str | os.PathLike) -> ModelSpec:
    """The model shapes from a checkpoint directory's three config files."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    llm = Qwen3Config.from_hf_dict(_read_json(d / "config.json"))
    head_dict = _read_json(d / "vision_head_config.json")
    expected = set(HeadConfig.__dataclass_fields__)
    if set(head_dict) != expected:
        raise CheckpointError(
            f"{d / 'vision_head_config.json'} must hold exactly the keys {sorted(expected)}; "
            f"missing {sorted(expected - set(head_dict))}, extra {sorted(set(head_dict) - expected)}")
    head = HeadConfig(**head_dict)
    ae = AEConfig.from_json_dict(_read_json(d / "ae_config.json"))
    name = f"{d.name}"
    return ModelSpec(name, llm, head, ae)


def _llm_files(d: Path) -> dict[str, Path]:
    """Map each LLM key to the safetensors file that holds it (single or sharded)."""
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {k: d / v for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {index.name} but missing")
        return files
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(
        f"no language model weights in {d}: expected model.safetensors or "
        "model.safetensors.index.json with its shards")


def _load_tensors(files: dict[str, Path], module: nn.Module, dtype, device, what: str):
    """Strictly load ``files`` (key -> file) into ``module`` built on the meta device."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    some_file = next(iter(files.values()), None)
    missing = sorted(set(expected) - set(files))
    if missing:
        where = some_file.name if some_file else what
        raise CheckpointError(
            f"{where}: missing key {missing[0]!r} ({len(missing)} missing) for the {what}; "
            "is this a BitDance checkpoint of the same model?")
    extra = sorted(set(files) - set(expected))
    if extra:
        raise CheckpointError(
            f"{files[extra[0]].name}: unexpected key {extra[0]!r} ({len(extra)} unexpected) "
            f"for the {what} described by the config files")
    state = {}
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        try:
            handle = safe_open(f, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} cannot be read as safetensors ({e})") from None
        with handle:
            for k in keys:
                shape = tuple(handle.get_slice(k).get_shape())
                if shape != expected[k]:
                    raise CheckpointError(
                        f"{f.name}: key {k!r} has shape {list(shape)}, the config expects "
                        f"{list(expected[k])}")
                state[k] = handle.get_tensor(k).to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _module_files(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: path for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e})") from None


@dataclass
class BitDanceModel:
    """The four networks, the tokenizer and the shapes, ready for inference."""

    spec: ModelSpec
    llm: Qwen3ForCausalLM
    head: DiffusionHead
    ae: BinaryAutoencoder
    projector: Projector
    tokenizer: object | None
    dtype: torch.dtype
    device: torch.device
    path: Path | None = None
    extras: dict = field(default_factory=dict)


def _on_meta(factory):
    with torch.device("meta"):
        return factory()


def load_checkpoint(ckpt_dir, dtype=torch.float32, device="cpu", load_encoder: bool = False,
                    weights: bool = True) -> BitDanceModel:
    """Load a checkpoint directory; weights are converted to ``dtype`` on ``device``.

    The encoder of the autoencoder is only needed to tokenize images; it is skipped unless
    ``load_encoder`` (its keys are still checked). ``weights=False`` reads only the configs and
    the tokenizer (the networks are None): enough for a backend whose engines hold the weights.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    spec = read_spec(d)
    device = torch.device(device)
    tokenizer = load_tokenizer(d)
    if not weights:
        return BitDanceModel(spec, None, None, None, None, tokenizer, dtype, device, d)

    llm = _on_meta(lambda: Qwen3ForCausalLM(spec.llm))
    _load_tensors(_llm_files(d), llm, dtype, device, "language model")
    llm.model.register_buffer(
        "inv_freq", rope_inv_freq(spec.llm.head_dim, spec.llm.rope_theta).to(device),
        persistent=False)

    head = _on_meta(lambda: DiffusionHead(spec.head))
    _load_tensors(_module_files(d / "vision_head.safetensors"), head, dtype, device,
                  "diffusion head")
    proj = _on_meta(lambda: Projector(spec.ae.z_channels, spec.llm.hidden_size))
    _load_tensors(_module_files(d / "projector.safetensors"), proj, dtype, device, "projector")

    ae = _on_meta(lambda: BinaryAutoencoder(spec.ae))
    ae_files = _module_files(d / "ae.safetensors")
    if not load_encoder:
        # Check the encoder's keys, load only the decoder's tensors.
        expected = set(ae.state_dict())
        missing = sorted(k for k in expected if k.startswith("encoder.") and k not in ae_files)
        if missing:
            raise CheckpointError(f"ae.safetensors: missing key {missing[0]!r}")
        ae.encoder = None
        ae_files = {k: f for k, f in ae_files.items() if not k.startswith("encoder.")}
    _load_tensors(ae_files, ae, dtype, device, "autoencoder")

    for m in (llm, head, ae, proj):
        m.eval().requires_grad_(False)
    return BitDanceModel(spec, llm, head, ae, proj, tokenizer, dtype, device, d)


WEIGHT_FILES = ("vision_head.safetensors", "projector.safetensors", "ae.safetensors")


def weight_files(ckpt_dir) -> list[Path]:
    """Every safetensors file of a checkpoint: the LLM's (single or shards), then the others."""
    d = Path(ckpt_dir)
    files = sorted(set(_llm_files(d).values()))
    for name in WEIGHT_FILES:
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name} is missing: a BitDance checkpoint directory needs it")
        files.append(d / name)
    return files


def weights_fingerprint(ckpt_dir, samples: int = 16, chunk: int = 4096) -> str:
    """A quick fingerprint of a checkpoint's weights (milliseconds, even at 14B).

    Per weight file, in order: its name and size, its safetensors header (every key with its
    dtype, shape and offsets) and ``samples`` evenly spaced ``chunk``-byte pieces of the tensor
    data (small files whole). Another architecture changes the headers; other values of the
    same architecture (another seed, a fine-tune) change the sampled bytes. It is not a hash of
    every byte: a change confined to bytes between the samples goes unnoticed.
    """
    import hashlib
    import struct

    h = hashlib.sha256()
    for path in weight_files(ckpt_dir):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            if size <= 2 * samples * chunk:
                h.update(f.read())
                continue
            head_len = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(head_len))
            start = 8 + head_len
            span = max(0, size - start - chunk)
            for i in range(samples):
                f.seek(start + span * i // max(1, samples - 1))
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def random_model(spec: ModelSpec, dtype=torch.float32, device="cpu", seed: int = 0,
                 with_encoder: bool = False) -> BitDanceModel:
    """A model of ``spec``'s shapes with random weights (benchmarks at any preset)."""
    from .tiny import randomize_

    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    parts = []
    for factory in (lambda: Qwen3ForCausalLM(spec.llm), lambda: DiffusionHead(spec.head),
                    lambda: BinaryAutoencoder(spec.ae),
                    lambda: Projector(spec.ae.z_channels, spec.llm.hidden_size)):
        m = _on_meta(factory).to(dtype)  # cast on meta: no float32 copy of 14B weights
        m.to_empty(device=device)
        randomize_(m, gen)
        parts.append(m.eval().requires_grad_(False))
    llm, head, ae, proj = parts
    llm.model.register_buffer(
        "inv_freq", rope_inv_freq(spec.llm.head_dim, spec.llm.rope_theta).to(device),
        persistent=False)
    if not with_encoder:
        ae.encoder = None
    return BitDanceModel(spec, llm, head, ae, proj, None, dtype, device, None)


# ----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read by the tokenizers package ({e})") from None
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(
                f"{self.path.name} has no special token {token!r}; BitDance needs it "
                "(SPEC section 1 lists the image tokens)")
        return i


def load_tokenizer(ckpt_dir) -> Tokenizer:
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    return Tokenizer(path)
