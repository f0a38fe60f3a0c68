"""Which TensorRT: datacenter TensorRT (``tensorrt``) or TensorRT for RTX (``tensorrt_rtx``).

Both have the same Python API for what this toolkit does (parse ONNX, build a strongly typed
network with optimization profiles, deserialize, run on a stream), so everything else is
written once against :class:`Flavor`. The flavor is the first of :data:`ORDER` that imports,
or the one forced by ``--trt NAME`` / the environment variable :data:`ENV`.

Which GPU needs which:

- datacenter TensorRT (``tensorrt``): any NVIDIA GPU from Ampere on, including Hopper (H100,
  H200: sm90) and datacenter Blackwell (B200: sm100); it has plugin layers (``--attention
  plugin``). It builds an engine on the GPU that will run it (or one of the same compute
  capability). ``pip install tensorrt`` fetches it from NVIDIA's package index.
- TensorRT-RTX (``tensorrt_rtx``, ``pip install tensorrt-rtx-cu12``): GeForce and RTX PRO
  cards (Ampere sm80/sm86, Ada sm89, Blackwell sm120/sm121; Turing sm75 only when asked for).
  It builds without a GPU (ahead of time) engines that are portable across those cards and
  compiles their kernels on the device at first use. No Hopper or datacenter Blackwell target,
  no plugin layers: use ``--attention native``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from .errors import BitDanceError

ENV = "BITDANCE_TRT"
ORDER = ("tensorrt", "tensorrt_rtx")
LABEL = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
INSTALL = ("install datacenter TensorRT for H100/H200/B200 and other datacenter GPUs (pip "
           "install tensorrt, which fetches its libraries from NVIDIA's package index) or "
           "TensorRT-RTX for GeForce and RTX PRO cards (pip install tensorrt-rtx-cu12, or pip "
           "install 'bitdance-rt[trt]')")
# what TensorRT-RTX engines run on when no target is set (its documented portable default)
RTX_DEFAULT_TARGETS = ("sm80", "sm86", "sm89", "sm120", "sm121")
# every GPU TensorRT-RTX can build for and run on (Turing to consumer Blackwell; no Hopper sm90
# and no datacenter Blackwell sm100): used when its module does not list them
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
# the layers that --attention native graphs become (ONNX Attention, TensorScatter), and the
# first datacenter TensorRT whose ONNX parser makes them
NATIVE_LAYERS = ("ATTENTION_OUTPUT", "KV_CACHE_UPDATE")
NATIVE_MIN_VERSION = (10, 15)
GPU_NAMES = {"sm90": "Hopper: H100/H200", "sm100": "Blackwell: B200", "sm103": "Blackwell: B300"}


class TensorRTError(BitDanceError):
    """No usable TensorRT, or a TensorRT that cannot do what was asked."""


def sm_name(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


@dataclass
class Flavor:
    """One imported TensorRT: its module, name and version."""

    name: str
    trt: object

    @property
    def label(self) -> str:
        return LABEL[self.name]

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def plugins(self) -> bool:
        """Whether networks can hold plugin layers (``--attention plugin``)."""
        return not self.rtx

    def compute_capabilities(self) -> dict:
        """``{"sm89": enum, ...}``: the targets an engine can be built for without the GPU
        (TensorRT-RTX); empty for datacenter TensorRT, which builds for the GPU it runs on."""
        enum = getattr(self.trt, "ComputeCapability", None)
        if not self.rtx or enum is None:
            return {}
        return {name.lower(): value for name, value in enum.__members__.items()
                if name.startswith("SM")}

    def targets(self) -> tuple[str, ...] | None:
        """The GPUs this flavor's engines can run on (TensorRT-RTX: its compute-capability
        targets); None for datacenter TensorRT, which builds for the GPU it runs on."""
        if not self.rtx:
            return None
        return tuple(sorted(self.compute_capabilities(), key=_sm_key)) or RTX_TARGETS

    def native_attention(self) -> str | None:
        """None when ``--attention native`` graphs build here (TensorRT's attention and KV-cache
        update layers exist), else why not, with the fix (one line)."""
        layer_type = getattr(self.trt, "LayerType", None)
        missing = [n for n in NATIVE_LAYERS if not hasattr(layer_type, n)]
        old = not self.rtx and _version_tuple(self.version) < NATIVE_MIN_VERSION
        if not missing and not old:
            return None
        alt = "or export with --attention standard"
        if self.rtx:
            return (f"--attention native graphs need TensorRT-RTX's attention and KV-cache "
                    f"update layers, which {self.label} {self.version} lacks; pip install -U "
                    f"tensorrt-rtx-cu12, {alt}")
        need = ".".join(map(str, NATIVE_MIN_VERSION))
        return (f"--attention native graphs need TensorRT >= {need} (its attention and "
                f"KV-cache update layers), and this is {self.label} {self.version}; pip "
                f"install -U 'tensorrt>={need}', {alt}")

    def logger(self):
        return self.trt.Logger(self.trt.Logger.WARNING)


def _sm_key(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def host_refusal(flavor: Flavor, gpu: str | None, then: str = "") -> str | None:
    """Why ``flavor`` cannot run engines on this machine's GPU (``gpu``: ``sm90``; None: no
    GPU, nothing to say), with a fix that works for it (``then``: what to do after installing
    datacenter TensorRT); None when it can. TensorRT-RTX has no Hopper (sm90) or datacenter
    Blackwell target: such a GPU needs datacenter TensorRT."""
    targets = flavor.targets()
    if gpu is None or targets is None or gpu in targets:
        return None
    if _sm_key(gpu) < 75:
        return (f"this machine's GPU is {gpu}, older than any TensorRT engine target (Turing, "
                "sm75, and newer); use --backend torch or onnxruntime")
    kind = f" ({GPU_NAMES[gpu]})" if gpu in GPU_NAMES else ""
    return (f"this machine's GPU is {gpu}{kind}, which {flavor.label} cannot build for or run "
            f"on (its targets: {', '.join(targets)}); to run engines here install datacenter "
            f"TensorRT (pip install tensorrt, from NVIDIA's package index){then}")


def load(name: str | None = None) -> Flavor:
    """The TensorRT to use: ``name`` (``tensorrt`` or ``tensorrt_rtx``), else the environment
    variable ``BITDANCE_TRT``, else the first that imports. A one-line error naming both
    install routes when none does."""
    if name is None:
        name = os.environ.get(ENV) or None
    if name is not None:  # an empty --trt is a mistake, not "any"
        name = name.strip().lower().replace("-", "_")
        if name not in ORDER:
            raise TensorRTError(f"unknown TensorRT flavor {name!r} (from --trt or {ENV}); "
                                f"choose one of {list(ORDER)}")
    reasons = []
    for candidate in ([name] if name else ORDER):
        try:
            module = importlib.import_module(candidate)
        except ImportError as e:
            reasons.append(f"{candidate}: {e}")
            continue
        if not hasattr(module, "Builder"):  # a stub package (NVIDIA's index not reached)
            reasons.append(f"{candidate}: installed without its libraries")
            continue
        return Flavor(candidate, module)
    which = f"{LABEL[name]} ({name}) is not" if name else "neither TensorRT nor TensorRT-RTX is"
    raise TensorRTError(f"{which} importable ({'; '.join(reasons)}); {INSTALL}")


def available() -> tuple[bool, str]:
    """(importable, why not): for tests and the CLI's help."""
    try:
        flavor = load()
    except TensorRTError as e:
        return False, str(e)
    return True, f"{flavor.label} {flavor.version}"


def gpu_target(device=None) -> str | None:
    """The compute capability of the CUDA device torch sees (``sm89``), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return sm_name(*torch.cuda.get_device_capability(device))
