"""A class-conditional request (:class:`ClassRequest`): checked against a checkpoint's
configs before any weights are read, run, and described in the images' metadata."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import RequestError
from ..request import check_numbers
from ..limits import DEFAULT_SEED
from .checkpoint import ImageNetModel
from .classes import class_name, resolve_class


@dataclass(frozen=True)
class ClassRequest:
    """``num_images`` images of one class; None settings take the model's defaults."""

    label: int | str
    num_images: int = 1
    seed: int = DEFAULT_SEED
    steps: int | None = None
    guidance: float | None = None

    def resolved(self, model: ImageNetModel, height: int | None = None,
                 width: int | None = None) -> "ClassRequest":
        """The request with its class as an index and the model's defaults filled in, every
        setting checked (:class:`RequestError`, one line). ``height``/``width``, when given,
        must be the model's image size."""
        spec, d = model.spec, model.defaults
        r = replace(self, label=resolve_class(self.label, spec.num_classes),
                    steps=d["steps"] if self.steps is None else self.steps,
                    guidance=d["guidance"] if self.guidance is None else self.guidance)
        check_numbers(r.num_images, r.steps, r.guidance, r.seed, "the authors sample with 100")
        size = spec.image_size
        for name, value in (("--height", height), ("--width", width)):
            if value is not None and value != size:
                raise RequestError(f"{name} {value}: this model makes {size}x{size} images "
                                   "only; leave the size out")
        return r

    @property
    def labels(self) -> list[int]:
        return [int(self.label)] * self.num_images

    def metadata(self, model: ImageNetModel, backend: str) -> dict:
        """The settings that made the images (PNG text chunks), as the text-to-image path
        records them: the request, the checkpoint and model, the backend, device and dtype."""
        from .. import dtypes

        return {"family": "imagenet", "class": int(self.label),
                "class_name": class_name(int(self.label)), "seed": self.seed,
                "steps": self.steps, "guidance": self.guidance,
                "size": f"{model.spec.image_size}x{model.spec.image_size}",
                "num_images": self.num_images,
                "checkpoint": str(model.path.resolve()) if model.path else "",
                "model": model.name, "backend": backend, "device": str(model.device),
                "dtype": dtypes.LONG[model.dtype], "software": "bitdance-rt"}
