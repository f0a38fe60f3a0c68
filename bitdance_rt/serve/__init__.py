"""Serving: a long-lived process that keeps the model warm and answers the OpenAI Images API.

- ``config.py``: :class:`ServeConfig`, the model and the limits, checked up front
- ``scheduler.py``: the bounded queue and the worker that batches compatible requests
- ``api.py``: the request body and its translation into a ``GenerationRequest``
- ``service.py``: one process's session, scheduler and metrics
- ``app.py``: the FastAPI app (images API, models, health, metrics, page)
- ``limits.py``: the rules against hostile or broken clients (body size, client timeouts, the
  count of every answer); ``redact.py``: no server path in an answer
- ``run.py``: uvicorn in this process; ``ray_app.py``: the same app on Ray Serve

The FastAPI side needs ``pip install 'bitdance-rt[serve]'`` (Ray: ``[ray]``); the scheduler does
not. Nothing here re-implements generation or validation: it calls the runtime's Session, or,
for a class-conditional ImageNet checkpoint, ``bitdance_rt.imagenet.serving.ImageNetSession``
(the same calls over ``bitdance_rt.imagenet.sample``).
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
