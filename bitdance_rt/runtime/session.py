"""The runtime as a library: a loaded model with its backend, ready to generate.

The CLI, the benchmarks and the server all hold a :class:`Session`; none of them resolves
devices, chooses backends or loads checkpoints itself::

    session = Session.open("models/BitDance-14B-64x", backend="torch", device="cuda")
    images = session.generate(GenerationRequest("a lighthouse at dusk", seed=7))

Everything a user can get wrong is checked in :meth:`Session.open` and
:meth:`Session.plan` before any weights are read or any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..checkpoint import BitDanceModel, load_checkpoint, read_spec
from ..errors import BitDanceError
from ..request import GenerationRequest, ImagePlan, plan_for
from .backend import Backend
from .loop import StepCallback, generate
from .timing import StageTimer

BACKENDS = ("torch", "reference", "onnxruntime", "tensorrt")
# backends that run exported graphs (--export-dir): the graphs hold the weights
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")




def builtin_checkpoint(say=None) -> Path:
    """The model used when no checkpoint is given: the built-in demo model, a small BitDance
    trained on captioned images of coloured shapes (``bitdance_rt/demo/weights``)."""
    from ..demo import WEIGHTS_DIR

    path = WEIGHTS_DIR
    if not (path / "bitdance_rt.json").is_file():
        raise BitDanceError(f"the built-in demo model is missing from this installation ({path}); "
                            "reinstall bitdance-rt, or pass --checkpoint DIR")
    if say:
        info = read_spec(path).info
        (h, w) = info.sizes[0]
        say(f"no --checkpoint given: using the built-in demo model ({info.name}, {h}x{w}), "
            f"trained on coloured shapes with a vocabulary of {len(info.vocabulary)} words; "
            "prompts like 'a red circle on the left, on a white background'")
    return path


def export_source(engine_dir, say=None) -> Path | None:
    """The checkpoint an export (or its engines/) was made from, as its manifest records it,
    when that directory is still there; None otherwise."""
    from ..manifest import MANIFEST, read_manifest

    d = Path(engine_dir)
    if not (d / MANIFEST).is_file():
        return None
    source = (read_manifest(d).get("source") or {}).get("checkpoint")
    if not source or not Path(source).is_dir():
        return None
    if say:
        say(f"no --checkpoint given: using {source}, the checkpoint {d} was exported from")
    return Path(source)


def resolve_device(device: str | None) -> torch.device:
    """``None`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:")
                                                 and name[5:].isdigit()):
        raise BitDanceError(f"--device must be cpu, cuda or cuda:N (lower case); got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BitDanceError(f"--device {name} was asked for but no CUDA device is visible; "
                                "use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise BitDanceError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                "device(s) are visible")
    return torch.device(name)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``: bfloat16 on CUDA, float32 on the CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtypes.parse(dtype)


def check_backend(name: str, engine_dir) -> None:
    if name not in BACKENDS:
        raise BitDanceError(f"unknown --backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "onnxruntime" and engine_dir is None:
        raise BitDanceError("--backend onnxruntime needs --export-dir, a directory written by "
                            "`bitdance-export`")
    if name == "tensorrt" and engine_dir is None:
        raise BitDanceError("--backend tensorrt needs --export-dir, a directory written by "
                            "`bitdance-export build` (or an export directory holding engines/)")
    if name not in GRAPH_BACKENDS and engine_dir is not None:
        raise BitDanceError(f"--export-dir is for --backend onnxruntime or tensorrt, not {name}")


def make_backend(name: str, model: BitDanceModel, engine_dir=None, cuda_graphs: bool = True,
                 compile: bool = False) -> Backend:
    """The backend ``name`` over ``model`` (whose weights it needs, except onnxruntime's)."""
    check_backend(name, engine_dir)
    if name == "reference":
        from .backends.reference import ReferenceBackend

        return ReferenceBackend(model)
    if name == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(model, cuda_graphs=cuda_graphs, compile=compile)
    if name == "tensorrt":
        from .backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, engine_dir, cuda_graphs=cuda_graphs)
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, engine_dir)


def preflight(checkpoint, *requests: GenerationRequest) -> tuple[ImagePlan, BitDanceModel]:
    """The plan of ``requests`` from a checkpoint's configs and tokenizer, without reading its
    weights (sizes, numbers, prompt length checked): errors before any slow work. Returns the
    plan and the configs it was made with, which ``Session.open(..., configs=)`` reuses
    instead of reading them again."""
    configs = load_checkpoint(checkpoint, weights=False)
    return plan_for(configs, *requests), configs


@dataclass
class Session:
    """A model and one backend over it."""

    model: BitDanceModel
    backend: Backend
    checkpoint: Path | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, checkpoint, backend: str = "torch", device: str | None = None,
             dtype: str | None = None, engine_dir=None, cuda_graphs: bool = True,
             compile: bool = False, warn=None, configs: BitDanceModel | None = None) -> "Session":
        """Check every setting, then load the checkpoint (the onnxruntime backend reads only
        its configs and tokenizer: its graphs hold the weights) and build the backend.
        ``warn(message)`` hears of settings that work but are slow; ``configs`` (a
        ``load_checkpoint(..., weights=False)`` of the same directory, e.g. a preflight's) are
        used instead of reading the configs and tokenizer again."""
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        check_backend(backend, engine_dir)
        if (warn and dev.type == "cpu" and torch_dtype != torch.float32
                and backend not in GRAPH_BACKENDS):
            warn(f"--dtype {dtypes.LONG[torch_dtype]} on the CPU is about 10x slower than "
                 "float32 (the CPU has no fast kernels for it here); drop --dtype on the CPU")
        model = load_checkpoint(checkpoint, dtype=torch_dtype, device=dev,
                                weights=backend not in GRAPH_BACKENDS, configs=configs)
        be = make_backend(backend, model, engine_dir, cuda_graphs, compile)
        return cls(model, be, Path(checkpoint), {
            "backend": backend, "device": str(dev), "dtype": dtypes.LONG[torch_dtype]})

    @property
    def spec(self):
        return self.model.spec

    def plan(self, *requests: GenerationRequest) -> ImagePlan:
        """The AR plan of one request, or of several that share a size, steps and guidance;
        every setting is checked here (sizes, prompt length, numbers) and each prompt
        tokenized, once."""
        return plan_for(self.model, *requests)

    @torch.no_grad()
    def generate(self, *items, on_step=None, timer: StageTimer | None = None) -> list:
        """One AR run for all ``items`` (batched): requests (planned here) or the plans of
        :meth:`plan` (used as they are). Returns, per request, its uint8 images ``[n, H, W,
        3]``. Each request draws from its own seed: its images are those it gives alone.
        ``on_step(done, total)`` is called after every block; it may return the indices (among
        the requests) of requests to drop: they stop being computed at once (the others'
        images do not change) and their entry in the result is None."""
        plan = ImagePlan.merge(*[i if isinstance(i, ImagePlan) else self.plan(i)
                                 for i in items])
        spans, start = [], 0
        for r in plan.requests:
            spans.append(range(start, start + r.num_images))
            start += r.num_images
        dropped = set()

        def step(done, total):
            drop = set(on_step(done, total) or ()) if on_step else set()
            dropped.update(drop)
            return [i for j in drop for i in spans[j]]

        images = generate(self.backend, plan, plan.seeds, timer, step)
        return [None if j in dropped else images[span.start:span.stop]
                for j, span in enumerate(spans)]

    def metadata(self, request) -> dict:
        """What a PNG records of how it was made (text chunks); ``request`` a request or a
        one-request plan."""
        r = request.request if isinstance(request, ImagePlan) else request.resolved(self.spec)
        return {"prompt": r.prompt, "seed": r.seed, "height": r.height, "width": r.width,
                "steps": r.steps, "guidance": r.guidance,
                "checkpoint": str(self.checkpoint) if self.checkpoint else "",
                "model": self.spec.name, **self.settings, "software": "bitdance-rt"}
