"""A class-conditional ImageNet model behind the server (``bitdance-rt serve --checkpoint DIR``
with an ImageNet directory): :class:`ImageNetSession` answers the calls the server's scheduler
and service make of a text-to-image :class:`~bitdance_rt.runtime.session.Session` (``plan``,
``generate``, ``metadata``, ``settings``, ``checkpoint``), over :mod:`.sample`.

A request is planned once (:class:`ClassPlan`: its class resolved, the defaults filled in,
every number checked) and travels to the scheduler as it does for text-to-image. Several plans
of the same steps and guidance run as one AR run: their labels in order and one ``(seed,
images)`` pair per request, so each request draws from its own generator and its images are
decoded as their own batch: a served image is the image ``bitdance-rt generate -c DIR --class
C --seed S`` writes, whether it ran alone or batched (bit for bit on the CPU in float32).

Unlike the text-to-image runtime, the sampler cannot drop a request's rows in the middle of a
run: a request given up while running (its client left, its time passed) is answered at once,
but its rows are computed to the end of the run (the others' images do not change). A run
whose requests have all gone is abandoned at the next AR step, as for text-to-image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BitDanceError
from .checkpoint import ImageNetModel
from .request import ClassRequest

FAMILY = "imagenet"
SERVE_BACKENDS = ("torch", "reference")   # the PyTorch runners; the graphs are not served


@dataclass(frozen=True)
class ClassPlan:
    """One AR run of resolved :class:`ClassRequest` s (class index, steps and guidance filled
    in) that share steps and guidance, in order."""

    requests: tuple

    @property
    def request(self) -> ClassRequest:
        """The request of a one-request plan."""
        if len(self.requests) != 1:
            raise ValueError(f"this plan holds {len(self.requests)} requests, not one")
        return self.requests[0]

    @property
    def steps(self) -> int:
        return self.requests[0].steps

    @property
    def guidance(self) -> float:
        return self.requests[0].guidance

    @property
    def batch_key(self) -> tuple:
        """What requests must share to run together (the image size is the model's)."""
        return (FAMILY, self.steps, float(self.guidance))

    @property
    def labels(self) -> list[int]:
        return [label for r in self.requests for label in r.labels]

    @property
    def seeds(self) -> list[tuple[int, int]]:
        """``(seed, images)`` per request, as :func:`.sample.generate` takes them."""
        return [(r.seed, r.num_images) for r in self.requests]

    @classmethod
    def merge(cls, *plans: "ClassPlan") -> "ClassPlan":
        """One run of several plans (of the same steps and guidance), in order."""
        first = plans[0]
        for p in plans[1:]:
            if p.batch_key != first.batch_key:
                raise BitDanceError("requests in one batch must have the same steps and "
                                    "guidance")
        return cls(tuple(r for p in plans for r in p.requests))


class ImageNetSession:
    """A loaded ImageNet model and the runner of one backend (``torch`` or ``reference``)."""

    family = FAMILY

    def __init__(self, model: ImageNetModel, backend: str = "torch",
                 checkpoint: Path | None = None, settings: dict | None = None):
        if backend not in SERVE_BACKENDS:
            raise BitDanceError(f"--backend {backend}: class-conditional ImageNet checkpoints "
                                f"are served with --backend {' or '.join(SERVE_BACKENDS)}")
        self.model, self.backend = model, backend
        self.checkpoint = Path(checkpoint) if checkpoint is not None else model.path
        from .. import dtypes

        self.settings = settings or {"backend": backend, "device": str(model.device),
                                     "dtype": dtypes.LONG[model.dtype]}

    @classmethod
    def open(cls, checkpoint, backend: str = "torch", device: str | None = None,
             dtype: str | None = None) -> "ImageNetSession":
        """Check the settings, then load ``checkpoint`` on ``device`` in ``dtype`` (the
        defaults of ``generate``: CUDA when present, bfloat16 there, float32 on the CPU)."""
        from .. import dtypes
        from ..runtime.session import resolve_device, resolve_dtype
        from .checkpoint import load

        if backend not in SERVE_BACKENDS:
            raise BitDanceError(f"--backend {backend}: class-conditional ImageNet checkpoints "
                                f"are served with --backend {' or '.join(SERVE_BACKENDS)}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model = load(checkpoint, dt, dev)
        return cls(model, backend, Path(checkpoint),
                   {"backend": backend, "device": str(dev), "dtype": dtypes.LONG[dt]})

    # -- what the server asks of a model ------------------------------------------------------

    @property
    def name(self) -> str:
        """The released preset's name, or for another shape the checkpoint directory's."""
        if self.model.name == "custom" and self.checkpoint is not None:
            return Path(self.checkpoint).name
        return self.model.name

    @property
    def image_size(self) -> int:
        return self.model.spec.image_size

    @property
    def num_classes(self) -> int:
        return self.model.spec.num_classes

    @property
    def num_blocks(self) -> int:
        """AR steps of every request (the progress events count these)."""
        return self.model.spec.num_blocks

    @property
    def defaults(self) -> dict:
        """``{"steps", "guidance"}`` of the checkpoint."""
        return dict(self.model.defaults)

    def plan(self, *requests: ClassRequest) -> ClassPlan:
        """The plan of one request, or of several of the same steps and guidance: each
        resolved and checked (:class:`~bitdance_rt.errors.RequestError`, one line)."""
        plans = [ClassPlan((r.resolved(self.model),)) for r in requests]
        return ClassPlan.merge(*plans)

    def generate(self, *items, on_step=None, timer=None) -> list:
        """One AR run for all ``items`` (requests, or plans of :meth:`plan`) of the same steps
        and guidance. Returns, per request, its uint8 images ``[n, H, W, 3]`` on the CPU.
        ``on_step(done, total)`` hears of every AR step (what it returns is ignored: rows are
        not dropped mid-run, see the module docstring); ``timer`` is not used."""
        from .sample import generate

        plans = [i if isinstance(i, ClassPlan) else self.plan(i) for i in items]
        run = ClassPlan.merge(*plans)
        seeds = run.seeds
        images = generate(self.model, run.labels, run.steps, run.guidance,
                          seeds if len(seeds) > 1 else seeds[0][0], backend=self.backend,
                          on_step=on_step).cpu()
        out, i = [], 0
        for r in run.requests:
            out.append(images[i:i + r.num_images])
            i += r.num_images
        return out

    def metadata(self, request) -> dict:
        """What ``bitdance-rt generate --class`` writes in the PNG's text chunks."""
        r = request.request if isinstance(request, ClassPlan) else request.resolved(self.model)
        return r.metadata(self.model, self.backend)

    def warmup_plan(self) -> ClassPlan:
        """One image of class 0, one head step, the default guidance."""
        return self.plan(ClassRequest(0, 1, seed=0, steps=1))
