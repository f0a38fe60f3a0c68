"""Converted checkpoint directories of the ImageNet family: writing them from the released
``.pt`` files (``bitdance-export convert``) and loading them.

A directory holds:

- ``bitdance_rt.json``: ``{"family": "imagenet", "format": 1, "name": preset or "custom",
  "architecture": {...}, "autoencoder": {"ddconfig": {...}, "gan_decoder": false},
  "defaults": {"steps", "guidance"}, "source": {...}}``. The ``family`` key tells every command
  which family a directory holds (the text-to-image checkpoints have no such key);
- ``model.safetensors``: the transformer and the head, the released key names;
- ``ae.safetensors``: the autoencoder (``encoder.*``, ``decoder.*``), as in the text-to-image
  checkpoints.

Loading checks every key and shape against the architecture and names the file and key of any
difference, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BitDanceError, CheckpointError
from ..files import MapOf, check_output_dir, read_json, staged_directory
from ..models.autoencoder import AEConfig, BinaryAutoencoder
from . import pt_files
from .spec import FAMILY, ImageNetSpec, check, defaults_for, match_preset
from .transformer import ClassConditionalTransformer, rope_table

INFO_FILE = "bitdance_rt.json"
MODEL_FILE = "model.safetensors"
AE_FILE = "ae.safetensors"
FORMAT = 1
OUTPUTS = (INFO_FILE, MODEL_FILE, AE_FILE)

SCHEMA = {"family": str, "format": int, "name": str, "architecture": MapOf((int, float)),
          "autoencoder": {"ddconfig": dict, "gan_decoder": bool},
          "defaults": {"steps": int, "guidance": float}}


def weight_files(path) -> list[Path]:
    """The weight files of a converted directory (its weights fingerprint covers these)."""
    return [Path(path) / MODEL_FILE, Path(path) / AE_FILE]


def family_of(path) -> str | None:
    """``"imagenet"`` for a directory of this family, else None (see
    :func:`bitdance_rt.checkpoint.family_of`, which owns the check)."""
    from ..checkpoint import family_of as family

    return family(path)


@dataclass
class ImageNetModel:
    """A loaded model: the transformer (with its head), the autoencoder's decoder, the shapes
    and the defaults."""

    spec: ImageNetSpec
    name: str
    defaults: dict
    transformer: ClassConditionalTransformer | None
    ae: BinaryAutoencoder | None
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    path: Path | None = None
    source: dict = field(default_factory=dict)


def read_info(path) -> tuple[ImageNetSpec, dict]:
    """The spec and the JSON of a converted directory (no weights read)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    where = d / INFO_FILE
    fix = "convert the released .pt files again with `bitdance-export convert`"
    info = read_json(where, "checkpoint info", error=CheckpointError, schema=SCHEMA, fix=fix)
    if info["family"] != FAMILY:
        raise CheckpointError(f"{where}: family {info['family']!r} is not {FAMILY!r}")
    if info["format"] != FORMAT:
        raise CheckpointError(f"{where}: format {info['format']} is not {FORMAT}, the one this "
                              f"version reads; {fix}")
    try:
        ae = AEConfig.from_json_dict(info["autoencoder"])
        spec = ImageNetSpec.from_json(info["architecture"], ae)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed architecture ({e}); {fix}") from None
    return check(spec, str(where)), info


def load(path, dtype=torch.float32, device="cpu", weights: bool = True) -> ImageNetModel:
    """A converted directory, weights converted to ``dtype`` on ``device`` (the encoder of the
    autoencoder is checked but not kept: generation only decodes). ``weights=False``: the
    spec and defaults only."""
    d = Path(path)
    spec, info = read_info(d)
    device = torch.device(device)
    model = ImageNetModel(spec, info["name"], info["defaults"], None, None, dtype, device, d,
                          info.get("source", {}))
    if not weights:
        return model
    from ..calibration.recipes import HEAD, TRANSFORMER
    from ..models.quant import read_layout, swap_modules

    layout = read_layout(d)  # a quantized checkpoint (`bitdance-export quantize`) or None
    with torch.device("meta"):
        transformer = ClassConditionalTransformer(spec)
        ae = BinaryAutoencoder(spec.ae)
        swap_modules(transformer, layout, TRANSFORMER)
        swap_modules(transformer.head, layout, HEAD)
    _load_file(d / MODEL_FILE, transformer, dtype, device, "model")
    _load_file(d / AE_FILE, ae, dtype, device, "autoencoder", skip="encoder.")
    ae.encoder = None
    transformer.rope = rope_table(spec).to(device)  # computed, not stored
    model.transformer = transformer.eval().requires_grad_(False)
    # the authors' sampler holds its convolution weights (so its activations) in
    # channels_last, and the CPU's convolutions and norms round differently in that layout
    model.ae = ae.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return model


def _load_file(path: Path, module, dtype, device, what: str, skip: str | None = None) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: an ImageNet checkpoint directory needs it")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is "
                              "damaged or incomplete: convert again") from None
    state = {}
    with handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        pt_files.check_keys(stored, expected, path.name, what)
        for k in stored:
            if skip and k.startswith(skip):
                continue
            try:
                tensor = handle.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{path} cannot be read ({e}); the file is damaged or "
                                      "incomplete: convert again") from None
            # quantized codes (E4M3, int8) keep their dtype; every float tensor takes ``dtype``
            keep = tensor.dtype in (torch.int8, torch.float8_e4m3fn)
            state[k] = tensor.to(device=device, dtype=None if keep else dtype)
    module.load_state_dict(state, strict=skip is None, assign=True)


# ----------------------------------------------------------------------------------------------
# bitdance-export convert


def _owned(d: Path, writes: set) -> set:
    return {n for n in OUTPUTS if (d / n).exists()}


def check_convert_output(out, size: int = 0) -> None:
    """``out`` is new, empty or an earlier output of ``convert`` with room for about ``size``
    bytes (checked before reading the weights)."""
    out = Path(out)
    check_output_dir(out, "converted checkpoint", INFO_FILE, _owned, set(OUTPUTS), size)
    if out.is_dir() and any(out.iterdir()) and family_of(out) != FAMILY:
        raise BitDanceError(f"--out {out} holds a {INFO_FILE} that is not an ImageNet "
                            "checkpoint's, so it is not an earlier output of convert; name a "
                            "new or empty directory")


@dataclass
class Converted:
    spec: ImageNetSpec
    name: str
    notes: list


def convert(model_pt, out, autoencoder_pt=None, weights: str = "ema") -> Converted:
    """Write the converted directory ``out`` from the released files (see the module
    docstring); returns what was found. The output replaces an earlier conversion only when
    complete."""
    out = Path(out)
    if weights not in pt_files.WEIGHTS:
        raise CheckpointError(f"--weights must be ema or model, got {weights!r}")
    sources = [Path(f) for f in (model_pt, autoencoder_pt) if f is not None]
    check_convert_output(out, sum(f.stat().st_size for f in sources if f.is_file()))
    converted, files = prepare(model_pt, autoencoder_pt, weights)
    with staged_directory(out, _owned, "converted checkpoint") as stage:
        write_converted(stage, *files)
    return converted


def prepare(model_pt, autoencoder_pt=None, weights: str = "ema"):
    """Read and check the released files; returns what was found and what to write
    (:func:`write_converted`'s arguments)."""
    notes = []
    ckpt = pt_files.read_pt(model_pt, "model checkpoint")
    sd, note = pt_files.model_weights(ckpt, model_pt, weights)
    notes += [note] if note else []
    vae = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    where = f"{model_pt} [{weights!r}]"
    ae_cfg = pt_files.infer_autoencoder(vae, where) if vae else None
    if autoencoder_pt is not None:
        ae_sd, skipped = pt_files.autoencoder_weights(
            pt_files.read_pt(autoencoder_pt, "autoencoder checkpoint"), autoencoder_pt)
        if skipped:
            notes.append(f"{autoencoder_pt}: left out {len(skipped)} training-only keys "
                         f"({skipped[0]}, ...)")
        file_cfg = pt_files.infer_autoencoder(ae_sd, str(autoencoder_pt))
        ae_cfg = ae_cfg or file_cfg
        if file_cfg != ae_cfg:
            raise CheckpointError(f"{autoencoder_pt} is another autoencoder ({_ae_text(file_cfg)}) "
                                  f"than the one in {model_pt} ({_ae_text(ae_cfg)})")
        ae_keys = _ae_shapes(ae_cfg)
        unknown = sorted(set(ae_sd) - set(ae_keys))
        if unknown:
            raise CheckpointError(f"{autoencoder_pt}: unexpected key {unknown[0]!r} for the "
                                  "autoencoder its other weights describe")
        for k, v in ae_sd.items():
            if tuple(v.shape) != ae_keys[k]:
                raise CheckpointError(f"{autoencoder_pt}: key {k!r} has shape {list(v.shape)}, "
                                      f"the autoencoder needs {list(ae_keys[k])}")
    elif vae:
        ae_sd = {}
        notes.append(f"no --autoencoder given: using the autoencoder stored in {model_pt}")
    else:
        raise CheckpointError(f"{where} holds no autoencoder (vae.*) weights; pass the "
                              "autoencoder checkpoint with --autoencoder AE.pt")
    spec = pt_files.infer_spec(sd, ae_cfg, where)
    pt_files.check_keys(sd, pt_files.expected_shapes(spec, with_vae=bool(vae)), where,
                        "model")
    # as the authors load them: the autoencoder file over the model's copy
    ae_state = {**vae, **ae_sd}
    pt_files.check_keys(ae_state, _ae_shapes(spec.ae), str(autoencoder_pt or model_pt),
                        "autoencoder")
    name = match_preset(spec)
    info = {
        "family": FAMILY, "format": FORMAT, "name": name,
        "architecture": spec.architecture(), "autoencoder": spec.ae.to_json_dict(),
        "defaults": defaults_for(spec),
        "source": {"model": Path(model_pt).name, "weights": "model" if note else weights,
                   "autoencoder": Path(autoencoder_pt).name if autoencoder_pt else None},
    }
    model_state = {k: v for k, v in sd.items() if not k.startswith("vae.")}
    return Converted(spec, name, notes), (info, model_state, ae_state)


def _ae_shapes(cfg: AEConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in BinaryAutoencoder(cfg).state_dict().items()}


def _ae_text(cfg: AEConfig) -> str:
    return f"ch {cfg.ch}, ch_mult {list(cfg.ch_mult)}, {cfg.num_res_blocks} res blocks"


def write_converted(d: Path, info: dict, model_state: dict, ae_state: dict) -> None:
    from safetensors.torch import save_file

    def tensors(state):
        return {k: v.detach().contiguous() for k, v in sorted(state.items())}

    save_file(tensors(model_state), str(d / MODEL_FILE), metadata={"format": "pt"})
    save_file(tensors(ae_state), str(d / AE_FILE), metadata={"format": "pt"})
    (d / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
