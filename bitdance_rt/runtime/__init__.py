"""The runtime: the AR loop written once (``loop.py``) over interchangeable backends."""

from .backend import Backend, ImagePlan
from .loop import generate, generate_tokens, plan_for
from .timing import StageTimer

__all__ = ["Backend", "ImagePlan", "StageTimer", "generate", "generate_tokens", "plan_for"]
