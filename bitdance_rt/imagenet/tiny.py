"""Tiny random-weight checkpoints of the ImageNet family (``bitdance-export make-tiny
--family imagenet``), in both forms: the ``.pt`` files as the authors' training script saves
them (``pt/``) and the converted directory made from them (the directory itself).

The weights are a pure function of the seed on any machine: they are drawn as uniform numbers
from a seeded ``torch.Generator`` (bits turned into floats exactly) and scaled with exact
float operations; normal draws are avoided because the CPU's normal sampler differs between
instruction sets. Sizes: width 128, 2 layers, 4 class tokens, 1000 classes, a 2-block head,
128x128 images (8x8 latents), an autoencoder at base width 32 (about 50 MB in all).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from ..errors import BitDanceError
from ..files import check_room, staged_directory
from ..models.autoencoder import AEConfig, BinaryAutoencoder
from .checkpoint import prepare, write_converted
from .spec import ImageNetSpec
from .transformer import ClassConditionalTransformer

PARALLEL = (1, 4, 16)
PT_DIR = "pt"
TINY_BYTES = 48 << 20  # about the most it takes on disk (both forms)
TINY_AE = AEConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)


def tiny_spec(parallel_num: int) -> ImageNetSpec:
    return ImageNetSpec(dim=128, n_layer=2, n_head=2, head_dim=128, head_layers=2,
                        head_adaln=2, parallel_num=parallel_num, cls_token_num=4,
                        num_classes=1000, latent_dim=32, image_size=128, ae=TINY_AE)


def pt_names(parallel_num: int) -> tuple[str, str]:
    return f"BitDance_tiny_{parallel_num}x.pt", "ae_tiny.pt"


def _uniform(shape, gen, std: float) -> torch.Tensor:
    """Uniform values of standard deviation ``std`` (exact on every machine)."""
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    return (u * 2.0 - 1.0) * (std * 3.0 ** 0.5)


@torch.no_grad()
def _random_state(module: torch.nn.Module, gen: torch.Generator) -> dict:
    """Values for every entry of ``module``'s state dict that keep activations O(1)."""
    state = {}
    for name, p in module.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = _uniform(p.shape, gen, 0.02)
        elif p.dim() == 1:  # norm weights
            value = 1.0 + _uniform(p.shape, gen, 0.1)
        elif name in ("cls_embedding.weight", "pos_for_diff.weight", "query_token"):
            value = _uniform(p.shape, gen, 1.0)
        else:  # linear and convolution weights: fan-in scaling
            value = _uniform(p.shape, gen, 1.0 / p[0].numel() ** 0.5)
        state[name] = value
    return state


def tiny_states(parallel_num: int, seed: int) -> tuple[dict, dict, dict]:
    """The tiny model's ``model`` and ``ema`` state dicts (each with the autoencoder's copy,
    ``vae.*``) and the autoencoder's state dict."""
    spec = tiny_spec(parallel_num)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model, ae = ClassConditionalTransformer(spec), BinaryAutoencoder(spec.ae)
    ae_state = _random_state(ae, gen)
    ae_state["decoder.conv_out.weight"] *= 0.3  # tiny images stay mostly in the uint8 range
    vae = {f"vae.{k}": v for k, v in ae_state.items()}
    trained = {**_random_state(model, gen), **vae}
    ema = {**_random_state(model, gen), **vae}
    return trained, ema, ae_state


def digest(*states: dict) -> str:
    """sha256 of state dicts (keys in order, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for state in states:
        for k in sorted(state):
            v = state[k].detach().contiguous().cpu()
            h.update(f"{k}|{v.dtype}|{list(v.shape)}\n".encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()


def write_pt_files(d: Path, parallel_num: int, seed: int) -> tuple[Path, Path]:
    """The authors' two files, as their scripts save and read them."""
    spec = tiny_spec(parallel_num)
    trained, ema, ae_state = tiny_states(parallel_num, seed)
    model_name, ae_name = pt_names(parallel_num)
    args = argparse.Namespace(model="tiny", image_size=spec.image_size,
                              parallel_num=parallel_num, cls_token_num=spec.cls_token_num,
                              latent_dim=spec.latent_dim, num_classes=spec.num_classes,
                              ema=0.9999, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": trained, "ema": ema, "epochs": 1, "args": args}, d / model_name)
    torch.save({"state_dict": ae_state}, d / ae_name)
    return d / model_name, d / ae_name


def make_tiny(out_dir, parallel_num: int = 1, seed: int = 0) -> Path:
    """Write a tiny checkpoint (see the module docstring) to the new or empty ``out_dir``."""
    if parallel_num not in PARALLEL:
        raise BitDanceError(f"--parallel-num must be one of {list(PARALLEL)} for the imagenet "
                            f"family, got {parallel_num}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BitDanceError(f"{out} is a file; make-tiny writes a checkpoint directory: choose "
                            "a new directory name")
    if out.is_dir() and any(out.iterdir()):
        raise BitDanceError(f"{out} already exists and is not empty; choose a new directory "
                            "(make-tiny does not write over files)")
    check_room({out: TINY_BYTES}, str(out), files=False)
    with staged_directory(out, None, "checkpoint") as stage:
        model_pt, ae_pt = write_pt_files(stage / PT_DIR, parallel_num, seed)
        _, files = prepare(model_pt, ae_pt)
        write_converted(stage, *files)
    return out
