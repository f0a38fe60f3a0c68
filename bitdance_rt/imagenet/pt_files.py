"""Reading the released ``.pt`` files of the ImageNet family without running their code, and
telling what model they hold from the shapes of their weights.

A model file is what the training script saves: ``{"model": state_dict, "ema": state_dict,
...}`` (possibly with the optimizer's state, the epoch and the script's ``argparse``
arguments); its state dict holds the transformer, the head and a copy of the autoencoder
(``vae.*``). An autoencoder file holds ``{"state_dict": {"encoder.*", "decoder.*"}}``; the
authors' sampler loads it over the model's ``vae.*`` (keys it lacks keep the model's values).

Files are read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers
only (plus ``argparse.Namespace``, which holds the training arguments and is rebuilt as plain
attributes). A file that needs any other Python object is refused, so a crafted file cannot
run code.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.autoencoder import AEConfig, BinaryAutoencoder
from .spec import ATTENTION_HEAD_DIM, LATENT_STRIDE, ImageNetSpec, check

WEIGHTS = ("ema", "model")
# training-side modules an autoencoder file may carry beside the autoencoder (not used here)
TRAINING_ONLY = ("loss.", "discriminator.")


def read_pt(path, what: str) -> dict:
    """The object in a ``.pt`` file, read without unpickling code (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist (or is not a file)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files of the legacy format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{what} {path} holds Python objects other than tensors and plain containers "
                f"({first}); it was not loaded, since loading it could run code: use the file "
                "as released, or save its state dicts again with torch.save") from None
        except Exception as e:  # a damaged or foreign file: zip, EOF or format errors
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"{what} {path} cannot be read as a PyTorch checkpoint "
                                  f"({type(e).__name__}: {first}); download it again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a checkpoint "
                              "dictionary")
    return obj


def _state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{where} is not a state dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: {k!r} holds {v.dtype} values, not floating point")
        bad = int(v.numel() - torch.isfinite(v).sum())
        if bad:
            raise CheckpointError(f"{where}: {k!r} holds {bad} NaN or infinite values (of "
                                  f"{v.numel()}); the file is damaged, or the weights diverged "
                                  "in training")
    return obj


def model_weights(ckpt: dict, path, weights: str = "ema") -> tuple[dict, str]:
    """The model state dict to use (``weights`` "ema" or "model") and a note when "ema" was
    asked for but the file has only "model" (the authors' sampler then takes "model")."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights must be ema or model, got {weights!r}")
    if weights in ckpt:
        return _state_dict(ckpt[weights], f"{path} [{weights!r}]"), ""
    if weights == "ema" and "model" in ckpt:
        return (_state_dict(ckpt["model"], f"{path} ['model']"),
                f"{path} has no 'ema' weights; using its 'model' weights")
    present = ", ".join(repr(k) for k in list(ckpt)[:8])
    raise CheckpointError(f"{path} holds no {weights!r} weights (its entries: {present}); "
                          "is it a BitDance ImageNet model checkpoint?")


def autoencoder_weights(ckpt: dict, path) -> tuple[dict, list[str]]:
    """The autoencoder's ``encoder.*``/``decoder.*`` tensors and the training-only keys left
    out."""
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} has no 'state_dict' entry; is it the BitDance "
                              "autoencoder checkpoint (ae_d16c32.pt)?")
    sd = _state_dict(ckpt["state_dict"], f"{path} ['state_dict']")
    skipped = sorted(k for k in sd if k.startswith(TRAINING_ONLY))
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY)}
    if not any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"{path} holds no decoder.* weights; is it the BitDance "
                              "autoencoder checkpoint?")
    return sd, skipped


def _need(sd: dict, key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{where}: missing key {key!r}; is this a BitDance ImageNet "
                              "checkpoint?")
    return sd[key]


def _count(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    n = len(found)
    if found != set(range(n)):
        raise CheckpointError(f"the indices of {pattern!r} are not 0..{n - 1}: {sorted(found)}")
    return n


def infer_autoencoder(ae: dict, where: str) -> AEConfig:
    """The ddconfig of an autoencoder state dict (``encoder.*``, ``decoder.*`` keys)."""
    z = _need(ae, "decoder.adaptive.0.gamma.weight", where).shape[1]
    conv_in = _need(ae, "decoder.conv_in.weight", where).shape[1]
    levels = _count(ae, r"decoder\.up\.(\d+)\.")
    blocks = _count(ae, r"decoder\.up\.0\.block\.(\d+)\.")
    widths = [_need(ae, f"decoder.up.{i}.block.0.conv1.weight", where).shape[0]
              for i in range(levels)]
    ch = ae["encoder.conv_in.weight"].shape[0] if "encoder.conv_in.weight" in ae else widths[0]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{where}: decoder widths {widths} are not multiples of the base "
                              f"width {ch}")
    return AEConfig(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks,
                    z_channels=z, gan_decoder=conv_in == 2 * z)


def infer_spec(sd: dict, ae: AEConfig, where: str) -> ImageNetSpec:
    """The architecture of a model state dict, from the shapes of its weights."""
    dim = _need(sd, "emb_norm.weight", where).shape[0]
    classes = _need(sd, "cls_embedding.weight", where).shape
    if classes[1] % dim:
        raise CheckpointError(f"{where}: cls_embedding.weight {list(classes)} is not a whole "
                              f"number of {dim}-wide class tokens")
    tokens = _need(sd, "pos_for_diff.weight", where).shape[0]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{where}: pos_for_diff.weight has {tokens} rows, not a square "
                              "latent grid")
    query = sd.get("query_token")
    spec = ImageNetSpec(
        dim=dim, n_layer=_count(sd, r"layers\.(\d+)\."), n_head=dim // ATTENTION_HEAD_DIM,
        head_dim=_need(sd, "head.net.input_proj.weight", where).shape[0],
        head_layers=_count(sd, r"head\.net\.res_blocks\.(\d+)\."),
        head_adaln=_count(sd, r"head\.net\.ada_ln_blocks\.(\d+)\."),
        parallel_num=1 if query is None else query.shape[1] + 1,
        cls_token_num=classes[1] // dim, num_classes=classes[0] - 1,
        latent_dim=_need(sd, "proj_in.w1.weight", where).shape[1],
        image_size=side * LATENT_STRIDE, ae=ae)
    return check(spec, where)


def expected_shapes(spec: ImageNetSpec, with_vae: bool) -> dict[str, tuple]:
    """Every key of the model's state dict (with its ``vae.*`` copy of the autoencoder when
    ``with_vae``) and its shape."""
    from .transformer import ClassConditionalTransformer

    with torch.device("meta"):
        model = ClassConditionalTransformer(spec)
        ae = BinaryAutoencoder(spec.ae) if with_vae else None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ae is not None:
        shapes.update({f"vae.{k}": tuple(v.shape) for k, v in ae.state_dict().items()})
    return shapes


def check_keys(sd: dict, expected: dict, where: str, what: str) -> None:
    """Exactly the ``expected`` keys with their shapes (``sd``: tensors or shapes); one line
    naming the first difference."""
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing) "
                              f"for the {what} its other weights describe")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected key {extra[0]!r} ({len(extra)} "
                              f"unexpected) for the {what} its other weights describe")
    for k, shape in expected.items():
        have = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else tuple(sd[k])
        if have != shape:
            raise CheckpointError(f"{where}: key {k!r} has shape {list(have)}, the {what} "
                                  f"needs {list(shape)}")
