"""Checkpoint directories in the released layout (listed below): presets, loading, tokenizer.

A checkpoint directory holds ``config.json`` + ``model*.safetensors`` (the Qwen3 LLM),
``tokenizer.json``, ``ae_config.json`` + ``ae.safetensors``, ``vision_head_config.json`` +
``vision_head.safetensors`` and ``projector.safetensors``. Loading checks keys and shapes
strictly and names the file and key of any mismatch.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BitDanceError, CheckpointError, RequestError
from .files import PLAIN_NAME, Check, MapOf, Nullable, Opt, check_schema, inside, read_json
from .models.autoencoder import AEConfig, BinaryAutoencoder
from .models.head import DiffusionHead, HeadConfig
from .models.projector import Projector
from .models.quant import read_layout, stored_dtypes, swap_modules
from .models.qwen3 import Qwen3Config, Qwen3ForCausalLM, rope_inv_freq
from .spec import ModelInfo, ModelSpec, PRESETS, preset  # noqa: F401  (re-exported)

INFO_FILE = "bitdance_rt.json"

# ----------------------------------------------------------------------------------------------
# Reading a directory


def _read_json(path: Path, schema=None) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    return read_json(path, "", error=CheckpointError, schema=schema,
                     fix="is this a BitDance checkpoint directory? download the file again")


# The types of the config files' values (checked before any value is used; the dataclasses'
# own checks, :meth:`ModelSpec.validate`, then check the ranges).
_DIM = Check(int, lambda v: 1 <= v <= 2**31 - 1, "an integer from 1 to 2^31-1")
_COUNT = Check(int, lambda v: 0 <= v <= 2**31 - 1, "an integer from 0 to 2^31-1")
_POSITIVE = Check(float, lambda v: v > 0, "a positive number")
LLM_SCHEMA = {
    "vocab_size": _DIM, "hidden_size": _DIM, "intermediate_size": _DIM,
    "num_hidden_layers": _DIM, "num_attention_heads": _DIM,
    "num_key_value_heads": Opt(_DIM), "head_dim": Opt(Nullable(_DIM)),
    "rms_norm_eps": Opt(_POSITIVE), "rope_theta": Opt(_POSITIVE),
    "max_position_embeddings": Opt(_DIM), "tie_word_embeddings": Opt(bool),
}
HEAD_SCHEMA = {
    "ch_target": _DIM, "ch_cond": _DIM, "ch_latent": _DIM, "depth_latent": _DIM,
    "depth_adanln": _DIM, "use_swiglu": bool, "parallel_num": _DIM, "time_shift": _POSITIVE,
    "time_schedule": str, "P_mean": float, "P_std": float, "diff_batch_mul": _DIM,
    "grad_checkpointing": bool,
}
AE_SCHEMA = {
    "ddconfig": {"ch": Opt(_DIM), "ch_mult": Opt(Check([_DIM], lambda v: len(v) >= 1,
                                                       "a non-empty array of integers >= 1")),
                 "num_res_blocks": Opt(_COUNT), "z_channels": Opt(_DIM),
                 "in_channels": Opt(_DIM), "out_ch": Opt(_DIM), "double_z": Opt(bool)},
    "gan_decoder": Opt(bool),
}
INDEX_SCHEMA = {"weight_map": MapOf(PLAIN_NAME)}


def read_spec(ckpt_dir: str | os.PathLike) -> ModelSpec:
    """The model shapes from a checkpoint directory's three config files (and what the model
    declares in ``bitdance_rt.json``, when it has one). Every config error is one line naming
    the file and the key."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    _refuse_other_family(d)
    llm = _parse(d / "config.json", Qwen3Config.from_hf_dict, schema=LLM_SCHEMA)
    head_path = d / "vision_head_config.json"
    head_dict = _read_json(head_path)
    expected = set(HeadConfig.__dataclass_fields__)
    if set(head_dict) != expected:
        raise CheckpointError(
            f"{head_path} must hold exactly the keys {sorted(expected)}; "
            f"missing {sorted(expected - set(head_dict))}, extra {sorted(set(head_dict) - expected)}")
    head = _parse(head_path, lambda h: HeadConfig(**h), head_dict, schema=HEAD_SCHEMA)
    ae = _parse(d / "ae_config.json", AEConfig.from_json_dict, schema=AE_SCHEMA)
    info_path = d / INFO_FILE
    info = (ModelInfo.from_json_dict(_read_json(info_path), info_path) if info_path.is_file()
            else ModelInfo())
    spec = ModelSpec(info.name or d.name, llm, head, ae, info)
    try:
        spec.validate()
    except ValueError as e:
        raise CheckpointError(f"{d}: {e}") from None
    return spec


def family_of(path) -> str | None:
    """The model family a directory's ``bitdance_rt.json`` declares: ``"imagenet"`` for the
    class-conditional models, else None (a text-to-image checkpoint, or not a checkpoint).
    Reads only that small file; a damaged one is the loader's to report."""
    from .files import parse_json

    info = Path(path) / INFO_FILE
    if not info.is_file():
        return None
    try:  # the same limits as every JSON file read
        value = parse_json(info.read_bytes(), str(info))
    except (OSError, BitDanceError):
        return None
    return "imagenet" if isinstance(value, dict) and value.get("family") == "imagenet" else None


def _refuse_other_family(d: Path) -> None:
    """A class-conditional ImageNet directory is named as such, not as a broken one."""
    if family_of(d) is not None:
        raise CheckpointError(f"{d} is a class-conditional ImageNet checkpoint; this command "
                              "takes text-to-image checkpoints (ImageNet ones run with "
                              "`bitdance-rt generate --class`)")


def _parse(path: Path, make, data=None, schema=None):
    """``make(json of path)``, after the values' types were checked against ``schema``; a
    missing key or a wrong type or range is reported as one line."""
    data = _read_json(path) if data is None else data
    if schema is not None:
        check_schema(data, schema, str(path), error=CheckpointError,
                     fix="correct it or download the file again")
    try:
        return make(data)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the key {e.args[0]!r}") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{path} has a value of the wrong type or range ({e})") from None


def _llm_files(d: Path) -> dict[str, Path]:
    """Map each LLM key to the safetensors file that holds it (single or sharded); shards are
    files inside the checkpoint directory."""
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.is_file():
        weight_map = _read_json(index, INDEX_SCHEMA)["weight_map"]
        fix = "download the checkpoint again"
        files = {k: inside(d, v, "shard", error=CheckpointError, fix=fix)
                 for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {index.name} but missing")
        return files
    if single.is_file():
        return _module_files(single)
    raise CheckpointError(
        f"no language model weights in {d}: expected model.safetensors or "
        "model.safetensors.index.json with its shards")


# Every weight is checked for NaN and infinity once: a file whose tensors were all found finite
# is recorded in the checkpoint directory's hash record and not checked again until it changes.
FINITE = "finite"


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or infinite (0 for integer and float8 codes)."""
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def check_finite(tensor: torch.Tensor, key: str, where, fix: str = "the file is damaged, or "
                 "the weights diverged in training: download it again") -> None:
    """Refuse a tensor with NaN or infinite values: one line naming the tensor and the file."""
    bad = nonfinite_count(tensor)
    if bad:
        raise CheckpointError(f"{where}: tensor {key!r} holds {bad} NaN or infinite value"
                              f"{'s' if bad > 1 else ''} (of {tensor.numel()}); {fix}")


@contextlib.contextmanager
def open_safetensors(path: Path, what: str = "safetensors", fix: str = "download it again"):
    """``safe_open(path)`` with every error of the file (not safetensors, truncated, a header
    that lies) one CheckpointError naming the file (read as ``what``) and ``fix``."""
    from safetensors import safe_open

    def damaged(e):
        return CheckpointError(f"{path} cannot be read as {what} ({_first_line(e)}); the "
                               f"file is damaged or incomplete: {fix}")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise damaged(e) from None
    try:
        with handle:
            yield handle
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, OverflowError) as e:
        raise damaged(e) from None
    except Exception as e:
        if type(e).__module__.startswith("safetensors"):
            raise damaged(e) from None
        raise


def _first_line(e) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


def _load_tensors(files: dict[str, Path], module: nn.Module, dtype, device, what: str,
                  skip: tuple = ()):
    """Strictly load ``files`` (key -> file) into ``module`` built on the meta device. Keys that
    start with a prefix in ``skip`` are checked (present, right shape) but not read; their
    tensors stay on the meta device for the caller to drop."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    stored = stored_dtypes(module)  # quantized weights keep their format's dtype
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
    from .verified import recall_verdict, remember_verdict, verdict_record

    for f, keys in by_file.items():
        record = verdict_record(f.parent)
        checked = recall_verdict(f.parent, FINITE, f.name, record)
        checked = set(checked) if isinstance(checked, list) else set()
        now = set()
        with open_safetensors(f) as handle:
            for k in keys:
                shape = tuple(handle.get_slice(k).get_shape())
                if shape != expected[k]:
                    raise CheckpointError(
                        f"{f.name}: key {k!r} has shape {list(shape)}, the config expects "
                        f"{list(expected[k])}")
                if k.startswith(skip) if skip else False:
                    continue
                tensor = handle.get_tensor(k)
                if k in stored and tensor.dtype != stored[k]:
                    raise CheckpointError(
                        f"{f.name}: key {k!r} is {tensor.dtype}, the checkpoint's quantization."
                        f"json says {stored[k]}; re-run `bitdance-export quantize`")
                if k not in checked:
                    check_finite(tensor, k, f)
                    now.add(k)
                state[k] = tensor.to(device=device, dtype=stored.get(k, dtype))
        if now:
            remember_verdict(f.parent, FINITE, {f.name: sorted(checked | now)}, record)
    module.load_state_dict(state, strict=not skip, assign=True)
    return module


def _module_files(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    with open_safetensors(path) as f:
        return {k: path for k in f.keys()}


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


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def load_checkpoint(ckpt_dir, dtype=torch.float32, device="cpu", load_encoder: bool = False,
                    weights: bool = True, num_layers: int | None = None,
                    configs: BitDanceModel | None = None) -> BitDanceModel:
    """Load a checkpoint directory; weights are converted to ``dtype`` on ``device``.

    Every key of every file is checked; what generation does not use is not read: the LM head
    (``lm_head.weight``, about 1.5 GB at 14B in bf16; images use the final hidden state) and,
    unless ``load_encoder``, the encoder of the autoencoder (only needed to tokenize images).
    ``weights=False`` reads only the configs and the tokenizer (the networks are None): enough
    for a backend whose engines hold the weights. ``num_layers`` keeps only the first K LLM
    layers and reads only theirs (full-width test exports of a 14B checkpoint on a small
    machine); ``extras["full_spec"]`` is then the checkpoint's own spec. ``configs``: this
    directory's ``load_checkpoint(..., weights=False)``, whose configs and tokenizer are used
    instead of reading them again.
    """
    d = Path(ckpt_dir)
    if configs is not None and configs.path is not None and configs.path.resolve() == d.resolve():
        full, tokenizer = configs.extras.get("full_spec", configs.spec), configs.tokenizer
    else:
        full, tokenizer = read_spec(d), load_tokenizer(d)
    spec = full.truncated(num_layers)
    device = torch.device(device)
    extras = {"full_spec": full} if spec is not full else {}
    if not weights:
        return BitDanceModel(spec, None, None, None, None, tokenizer, dtype, device, d, extras)

    layout = read_layout(d)  # a quantized checkpoint: its QuantLinear layers go in first
    llm = swap_modules(_on_meta(lambda: Qwen3ForCausalLM(spec.llm)), layout, "language model")
    llm_files = {k: f for k, f in _llm_files(d).items()
                 if not (m := _LAYER_KEY.match(k)) or int(m.group(1)) < spec.llm.num_hidden_layers}
    _load_tensors(llm_files, llm, dtype, device, "language model", skip=("lm_head.",))
    llm.lm_head = None
    llm.model.register_buffer(
        "inv_freq", rope_inv_freq(spec.llm.head_dim, spec.llm.rope_theta).to(device),
        persistent=False)

    head = swap_modules(_on_meta(lambda: DiffusionHead(spec.head)), layout, "diffusion head")
    _load_tensors(_module_files(d / "vision_head.safetensors"), head, dtype, device,
                  "diffusion head")
    proj = _on_meta(lambda: Projector(spec.ae.z_channels, spec.llm.hidden_size))
    _load_tensors(_module_files(d / "projector.safetensors"), proj, dtype, device, "projector")

    ae = _on_meta(lambda: BinaryAutoencoder(spec.ae))
    _load_tensors(_module_files(d / "ae.safetensors"), ae, dtype, device, "autoencoder",
                  skip=() if load_encoder else ("encoder.",))
    if not load_encoder:
        ae.encoder = None

    for m in (llm, head, ae, proj):
        m.eval().requires_grad_(False)
    return BitDanceModel(spec, llm, head, ae, proj, tokenizer, dtype, device, d, extras)


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


def weights_size(ckpt_dir, element_bytes: int | None = None, llm_share: float = 1.0) -> int:
    """Bytes of a checkpoint's weights: as stored, or at ``element_bytes`` bytes per element
    (what an export in another dtype writes), from the files' headers without loading them;
    the LLM's files count ``llm_share`` of their size (an export of its first layers)."""
    import math

    llm = set(_llm_files(Path(ckpt_dir)).values())
    total = 0.0
    for path in weight_files(ckpt_dir):
        if element_bytes is None:
            size = path.stat().st_size
        else:
            with open_safetensors(path) as f:
                size = element_bytes * sum(math.prod(f.get_slice(k).get_shape())
                                           for k in f.keys())
        total += size * (llm_share if path in llm else 1.0)
    return int(total)


def weights_fingerprint(ckpt_dir, samples: int = 16, chunk: int = 4096, files=None) -> str:
    """A quick fingerprint of a checkpoint's weights (milliseconds, even at 14B).

    Per weight file, in order: its name and size, its safetensors header (every key with its
    dtype, shape and offsets) and ``samples`` evenly spaced ``chunk``-byte pieces of the tensor
    data (small files whole). Another architecture changes the headers; other values of the
    same architecture (another seed, a fine-tune) change the sampled bytes. It is not a hash of
    every byte: a change confined to bytes between the samples goes unnoticed. ``files``: the
    weight files to take (default: a text-to-image checkpoint's, :func:`weight_files`).
    """
    import hashlib
    import struct

    h = hashlib.sha256()
    for path in (weight_files(ckpt_dir) if files is None else files):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            if size <= 2 * samples * chunk:
                h.update(f.read())
                continue
            head_len = struct.unpack("<Q", f.read(8))[0]
            if head_len > size - 8:
                raise CheckpointError(f"{path} cannot be read as safetensors (its header claims "
                                      f"{head_len} bytes of a {size}-byte file); the file is "
                                      "damaged or incomplete: download it again")
            h.update(f.read(head_len))
            start = 8 + head_len
            span = max(0, size - start - chunk)
            for i in range(samples):
                f.seek(start + span * i // max(1, samples - 1))
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


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
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # the tokenizers package's errors for text it cannot take
            raise RequestError(f"the tokenizer {self.path} cannot encode the prompt "
                               f"({_first_line(e)}); give the prompt as plain UTF-8 text") from None

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(
                f"{self.path.name} has no special token {token!r}; BitDance needs it "
                "(bitdance_rt/request.py lists the image tokens)")
        return i


def load_tokenizer(ckpt_dir) -> Tokenizer:
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a BitDance checkpoint directory needs it")
    return Tokenizer(path)
