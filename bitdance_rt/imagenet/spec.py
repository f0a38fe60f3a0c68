"""The class-conditional ImageNet family: what a model is without its weights, the released
presets and their defaults, and the shapes every weight of a model must have.

A model is a LlamaGen-style transformer (class embedding tokens, 2-D RoPE, RMSNorm, SwiGLU,
heads of 64 channels) that predicts ``parallel_num`` binary tokens per AR step with a
diffusion head, and the binary autoencoder's decoder. ``parallel_num`` (1, 4 or 16 for the
released models: the "1x", "4x", "16x" of their names) is the number of tokens per step, a
``sqrt(parallel_num)``-sided square patch of latent positions; with more than one, the
transformer takes ``parallel_num - 1`` learned query tokens after the class tokens and the head
attends across the ``parallel_num`` tokens of a step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import CheckpointError
from ..models.autoencoder import AEConfig

FAMILY = "imagenet"
LATENT_STRIDE = 16          # pixels per latent position (the autoencoder's downsampling)
ATTENTION_HEAD_DIM = 64     # the transformer's and the parallel head's attention heads
ROPE_BASE = 10000
NORM_EPS = 1e-6

# The sampling script's defaults; a released model's own guidance is in PRESETS.
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE = 4.6


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class ImageNetSpec:
    """The shapes of a class-conditional model (transformer, head, autoencoder)."""

    dim: int
    n_layer: int
    n_head: int
    head_dim: int               # the diffusion head's width (``diff_dim``)
    head_layers: int
    head_adaln: int             # shared adaLN layers of the head
    parallel_num: int = 1
    cls_token_num: int = 64
    num_classes: int = 1000
    latent_dim: int = 32
    image_size: int = 256
    time_shift: float = 1.0
    ae: AEConfig = AEConfig()

    @property
    def patch(self) -> int:
        return math.isqrt(self.parallel_num)

    @property
    def latent_side(self) -> int:
        return self.image_size // LATENT_STRIDE

    @property
    def num_tokens(self) -> int:
        return self.latent_side ** 2

    @property
    def num_blocks(self) -> int:
        """AR steps of one image."""
        return self.num_tokens // self.parallel_num

    @property
    def max_len(self) -> int:
        """KV slots per sequence (class tokens, queries, every image token but the last step's)."""
        return self.num_tokens + self.cls_token_num

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), 256)

    def validate(self) -> None:
        """ValueError naming the first setting the architecture cannot have."""
        if self.dim < ATTENTION_HEAD_DIM or self.dim % ATTENTION_HEAD_DIM:
            raise ValueError(f"width {self.dim} is not a multiple of {ATTENTION_HEAD_DIM} (the "
                             "attention heads have 64 channels)")
        if self.n_head * ATTENTION_HEAD_DIM != self.dim:
            raise ValueError(f"{self.n_head} heads of {ATTENTION_HEAD_DIM} channels do not make "
                             f"the width {self.dim}")
        if self.parallel_num < 1 or self.patch ** 2 != self.parallel_num:
            raise ValueError(f"tokens per step {self.parallel_num} is not a square (1, 4, 16)")
        if self.image_size % (LATENT_STRIDE * self.patch):
            raise ValueError(f"image size {self.image_size} is not a whole number of "
                             f"{self.patch}x{self.patch}-token patches of {LATENT_STRIDE} pixels")
        if self.head_layers < 1 or self.head_adaln < 1 or self.head_layers % self.head_adaln:
            raise ValueError(f"head depth {self.head_layers} must be a positive multiple of its "
                             f"adaLN layers {self.head_adaln}")
        if self.parallel_num > 1 and self.head_dim % ATTENTION_HEAD_DIM:
            raise ValueError(f"head width {self.head_dim} is not a multiple of "
                             f"{ATTENTION_HEAD_DIM} (its attention heads have 64 channels)")
        if self.cls_token_num < 1 or self.num_classes < 1:
            raise ValueError("a model needs at least one class token and one class")
        if self.ae.z_channels != self.latent_dim:
            raise ValueError(f"the autoencoder has {self.ae.z_channels} latent channels, the "
                             f"model {self.latent_dim}")
        if self.ae.downsample != LATENT_STRIDE:
            raise ValueError(f"the autoencoder downsamples by {self.ae.downsample}, the family "
                             f"needs {LATENT_STRIDE} (ch_mult of length 5)")
        if self.ae.gan_decoder:
            raise ValueError("the ImageNet family decodes with the plain decoder, not the "
                             "gan decoder")
        self.ae.validate()

    def config_hash(self) -> str:
        """A short hash of the shapes; ties exported graphs to a model."""
        import hashlib
        import json

        blob = json.dumps({"family": FAMILY, "architecture": self.architecture(),
                           "ae": self.ae.to_json_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def architecture(self) -> dict:
        """Everything but the autoencoder, as JSON."""
        d = dataclasses.asdict(self)
        d.pop("ae")
        return d

    @classmethod
    def from_json(cls, arch: dict, ae: AEConfig) -> "ImageNetSpec":
        fields = {f.name for f in dataclasses.fields(cls)} - {"ae"}
        unknown = set(arch) - fields
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}")
        for key, value in arch.items():
            if key != "time_shift" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        return cls(**arch, ae=ae)


@dataclass(frozen=True)
class Preset:
    spec: ImageNetSpec
    guidance: float             # the authors' CFG scale for the model (their README)
    steps: int = DEFAULT_STEPS  # head sampling steps (their sampling script's default)


def _preset(size: str, parallel_num: int, guidance: float) -> Preset:
    dim, layers, head_layers, head_adaln = {
        "b": (768, 24, 6, 2), "l": (1024, 32, 8, 2), "h": (1280, 40, 12, 3)}[size]
    spec = ImageNetSpec(dim=dim, n_layer=layers, n_head=dim // ATTENTION_HEAD_DIM,
                        head_dim=dim, head_layers=head_layers, head_adaln=head_adaln,
                        parallel_num=parallel_num)
    return Preset(spec, guidance)


PRESETS = {
    "imagenet-b-1x": _preset("b", 1, 3.2),
    "imagenet-b-4x": _preset("b", 4, 3.9),
    "imagenet-b-16x": _preset("b", 16, 6.1),
    "imagenet-l-1x": _preset("l", 1, 4.0),
    "imagenet-h-1x": _preset("h", 1, 4.55),
}


def match_preset(spec: ImageNetSpec) -> str:
    """The released preset with exactly these shapes, or "custom"."""
    for name, p in PRESETS.items():
        if p.spec == spec:
            return name
    return "custom"


def defaults_for(spec: ImageNetSpec) -> dict:
    name = match_preset(spec)
    if name in PRESETS:
        return {"steps": PRESETS[name].steps, "guidance": PRESETS[name].guidance}
    return {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}


def check(spec: ImageNetSpec, where: str) -> ImageNetSpec:
    try:
        spec.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return spec
