"""What a BitDance model is, without its weights: the shapes of its four networks, the image
sizes it generates and its default settings, and the named presets.

A checkpoint directory describes its shapes in its three config files (``config.json``,
``ae_config.json``, ``vision_head_config.json``: :func:`bitdance_rt.checkpoint.read_spec`). A model
that is not one of the released ones (the built-in demo model) may add ``bitdance_rt.json``
declaring the sizes it supports and its defaults; the released checkpoints have no such file
and get the 18 released sizes and the authors' defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from .errors import CheckpointError, UnsupportedSizeError
from .models.autoencoder import AEConfig
from .models.head import HeadConfig
from .models.qwen3 import Qwen3Config

QWEN3_VOCAB = 151936
TINY_VOCAB = 640  # the test tokenizer: 256 byte tokens + the special tokens, padded
LATENT_STRIDE = 16

# (height, width) in pixels, as the released models were trained.
RELEASED_SIZES = (
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024),
    (896, 1152), (768, 1280), (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024),
)


@dataclass(frozen=True)
class Defaults:
    """The settings ``generate`` uses when none are given."""

    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance: float = 7.5


@dataclass(frozen=True)
class ModelInfo:
    """What a model declares beyond its shapes (``bitdance_rt.json``; released models: none)."""

    name: str | None = None
    sizes: tuple = RELEASED_SIZES
    defaults: Defaults = Defaults()
    vocabulary: tuple = ()  # the words a small model was trained on (empty: any text)
    description: str = ""

    @classmethod
    def from_json_dict(cls, d: dict, where) -> "ModelInfo":
        from .files import Check, Nullable, Opt, check_schema

        side = Check(int, lambda v: 1 <= v <= 2**20, "a size in pixels from 1 to 2^20")
        schema = {
            "name": Opt(Nullable(str)), "description": Opt(Nullable(str)),
            "sizes": Opt(Check([[side]], lambda v: v and all(len(s) == 2 for s in v),
                               "a non-empty array of [height, width] pairs")),
            "defaults": Opt({"height": Opt(side), "width": Opt(side), "steps": Opt(int),
                             "guidance": Opt(float)}),
            "vocabulary": Opt([str]),
        }
        check_schema(d, schema, str(where), error=CheckpointError,
                     fix="it needs 'sizes' as [[height, width], ...] and 'defaults' with "
                     "height, width, steps, guidance")
        try:
            sizes = tuple((int(h), int(w)) for h, w in d.get("sizes", RELEASED_SIZES))
            defaults = Defaults(**d.get("defaults", {}))
            return cls(name=d.get("name"), sizes=sizes, defaults=defaults,
                       vocabulary=tuple(d.get("vocabulary", ())),
                       description=str(d.get("description") or ""))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where} is malformed ({e}); it needs 'sizes' as [[height, "
                                  "width], ...] and 'defaults' with height, width, steps, "
                                  "guidance") from None

    def to_json_dict(self) -> dict:
        return {"name": self.name, "sizes": [list(s) for s in self.sizes],
                "defaults": self.defaults.__dict__, "vocabulary": list(self.vocabulary),
                "description": self.description}


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of a whole BitDance model (all four parts) and what it generates."""

    name: str
    llm: Qwen3Config
    head: HeadConfig
    ae: AEConfig
    info: ModelInfo = field(default_factory=ModelInfo, compare=False)

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

    def validate(self) -> None:
        """ValueError naming the first setting that no BitDance model can have."""
        for cfg, where in ((self.llm, "config.json"), (self.head, "vision_head_config.json"),
                           (self.ae, "ae_config.json")):
            check_field_types(cfg, where)
        llm, head, ae, p = self.llm, self.head, self.ae, self.parallel_num
        self.head.validate()
        self.ae.validate()
        if p < 1 or self.patch ** 2 != p:
            raise ValueError(f"parallel_num {p} in vision_head_config.json must be a square "
                             "(4, 16 or 64: the tokens of a p x p patch)")
        if llm.num_attention_heads % llm.num_key_value_heads:
            raise ValueError(f"num_attention_heads {llm.num_attention_heads} in config.json "
                             f"must be a multiple of num_key_value_heads {llm.num_key_value_heads}")
        if llm.hidden_size % 4 or llm.head_dim % 2:
            raise ValueError("hidden_size must be a multiple of 4 and head_dim even")
        if head.ch_cond != llm.hidden_size or head.ch_target != ae.z_channels:
            raise ValueError(
                f"vision_head_config.json ch_cond {head.ch_cond} / ch_target {head.ch_target} "
                f"must equal the LLM's hidden_size {llm.hidden_size} / the autoencoder's "
                f"z_channels {ae.z_channels}")
        if ae.downsample != LATENT_STRIDE:
            raise ValueError(f"the autoencoder downsamples by {ae.downsample}; BitDance needs "
                             f"{LATENT_STRIDE} (ch_mult of length 5)")
        for h, w in self.info.sizes:
            if h % (LATENT_STRIDE * self.patch) or w % (LATENT_STRIDE * self.patch):
                raise ValueError(f"size {h}x{w} is not a whole number of {self.patch}x"
                                 f"{self.patch}-token patches")

    def truncated(self, num_layers: int | None) -> "ModelSpec":
        """The same model with only its first ``num_layers`` LLM layers (test exports)."""
        total = self.llm.num_hidden_layers
        if num_layers is None or num_layers == total:
            return self
        if not 1 <= num_layers <= total:
            raise CheckpointError(f"--num-layers must be between 1 and {total}, got {num_layers}")
        return dataclasses.replace(
            self, llm=dataclasses.replace(self.llm, num_hidden_layers=num_layers))

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) of a size this model supports; a clear error listing them otherwise."""
        return check_size(height, width, self.info.sizes)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(cfg, where: str) -> None:
    """ValueError if a field of a config dataclass has a value of the wrong type (a JSON
    string where a number belongs, say), naming the file and the key."""
    for f in dataclasses.fields(cfg):
        want = _TYPES.get(str(f.type))
        value = getattr(cfg, f.name)
        if want and (not isinstance(value, want) or (bool not in want and isinstance(value, bool))):
            raise ValueError(f"{where}: {f.name} must be of type {f.type}, got {value!r}")
        if str(f.type) == "int" and value < 0:
            raise ValueError(f"{where}: {f.name} must not be negative, got {value!r}")
        if str(f.type) == "int" and value > 2**31 - 1:
            raise ValueError(f"{where}: {f.name} must be below 2^31, got {value!r}")
        if str(f.type) == "float" and not math.isfinite(value):
            raise ValueError(f"{where}: {f.name} must be a finite number, got {value!r}")


def check_size(height: int, width: int, sizes=RELEASED_SIZES) -> tuple[int, int]:
    """Latent (h, w) of a supported pixel size (default: the released models' sizes)."""
    if (height, width) not in sizes:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise UnsupportedSizeError(
            f"image size {height}x{width} (height x width) is not supported by this model; "
            f"choose one of: {listed}")
    return height // LATENT_STRIDE, width // LATENT_STRIDE


def _preset_14b(parallel_num: int) -> ModelSpec:
    llm = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=5120, intermediate_size=17408,
                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                      head_dim=128)
    head = HeadConfig(ch_target=32, ch_cond=5120, ch_latent=5120, depth_latent=6,
                      depth_adanln=2, use_swiglu=True, parallel_num=parallel_num)
    return ModelSpec(f"14b-{parallel_num}x", llm, head, AEConfig())


def _small(name: str, parallel_num: int, hidden: int, mlp: int, layers: int, heads: int,
           head_dim: int, depth_adanln: int) -> ModelSpec:
    """A small model of the released architecture: the test tokenizer's vocabulary, 2 KV
    heads, a 2-block head as wide as the LLM, a 16x binary autoencoder at 32 base channels."""
    llm = Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=8192)
    head = HeadConfig(ch_target=32, ch_cond=hidden, ch_latent=hidden, depth_latent=2,
                      depth_adanln=depth_adanln, use_swiglu=True, parallel_num=parallel_num)
    ae = AEConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
    return ModelSpec(f"{name}-{parallel_num}x", llm, head, ae)


def preset_tiny(parallel_num: int) -> ModelSpec:
    """The test model of ``make-tiny`` (about 15 MB)."""
    return _small("tiny", parallel_num, hidden=128, mlp=256, layers=2, heads=4, head_dim=32,
                  depth_adanln=2)


def preset_mid(parallel_num: int) -> ModelSpec:
    """Sized for CPU benchmarks: LLM 512 x 4 layers, head 512 x 2 blocks, P 16.

    The MLP is 8x the width so that, as in the 14B model, attention over a full-size cache is a
    small part of a block step (512x512 image: 15% of the LLM FLOPs at the last block; 14B at
    1024x1024: 13%); a narrower MLP would make a CPU benchmark mostly measure attention."""
    return _small("mid", parallel_num, hidden=512, mlp=4096, layers=4, heads=8, head_dim=64,
                  depth_adanln=1)


PRESETS = {
    "14b-64x": lambda: _preset_14b(64),
    "14b-16x": lambda: _preset_14b(16),
    "14b": lambda: _preset_14b(64),
    "mid": lambda: preset_mid(16),
    "tiny": lambda: preset_tiny(4),
}


def preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise CheckpointError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
