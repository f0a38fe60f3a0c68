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

    def logger(self):
        return self.trt.Logger(self.trt.Logger.WARNING)


def load(name: str | None = None) -> Flavor:
    """The TensorRT to use: ``name`` (``tensorrt`` or ``tensorrt_rtx``), else the environment
    variable ``BITDANCE_TRT``, else the first that imports. A one-line error naming both
    install routes when none does."""
    name = name or os.environ.get(ENV) or None
    if name is not None:
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
