"""Which preset a checkpoint is: its shapes against the known presets, and ``--model``
checked against its configs."""

from __future__ import annotations

import dataclasses

from ..errors import BitDanceError
from ..spec import PRESETS, ModelSpec, preset, preset_tiny


def _shape_key(spec: ModelSpec) -> tuple:
    """What makes two specs the same model, the vocabulary size aside (a released checkpoint's
    config.json has the Qwen3 vocabulary plus BitDance's added tokens)."""
    llm = dataclasses.replace(spec.llm, vocab_size=0, max_position_embeddings=0)
    ae = dataclasses.replace(spec.ae, gan_decoder=False, extra={})
    return (llm, spec.head, ae)


def known_specs() -> dict[str, ModelSpec]:
    specs = {name: preset(name) for name in PRESETS}
    specs.update({f"tiny-{p}x": preset_tiny(p) for p in (4, 16, 64)})
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
