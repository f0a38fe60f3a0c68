"""The runtime: the AR loop written once (``loop.py``) over interchangeable backends, and the
library entry points the CLI, the benchmarks and the server share (``session.py``)."""

from ..request import GenerationRequest, ImagePlan, plan_for
from .backend import Backend
from .loop import generate, generate_tokens
from .timing import StageTimer

__all__ = ["Backend", "GenerationRequest", "ImagePlan", "StageTimer", "generate",
           "generate_tokens", "plan_for"]
