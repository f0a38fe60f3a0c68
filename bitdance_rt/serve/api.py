"""The OpenAI Images API request body and its translation into a
:class:`~bitdance_rt.request.GenerationRequest`, with every error a client can cause turned
into an :class:`ApiError` (status, one-line message, the field at fault).

Types are checked here (422); values by the library (``Session.plan``: the CLI's own
messages, 400), so a bad request never reaches the model.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError

from ..errors import BitDanceError, UnsupportedSizeError
from ..files import parse_json
from ..limits import DEFAULT_SEED
from ..request import GenerationRequest, ImagePlan

BODY_DEPTH = 4  # a request body is one flat object; deeper nesting is refused unparsed
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a one-line ``message`` (naming the
    problem and the fix), the request field at fault, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The OpenAI error shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class ImagesBody(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, plus ``seed``, ``steps``, ``guidance``
    and ``stream`` (progress as server-sent events)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    n: StrictInt = 1
    size: Optional[StrictStr] = None           # "WIDTHxHEIGHT", as OpenAI; None: the model's
    response_format: StrictStr = "b64_json"
    output_format: StrictStr = "png"
    model: Optional[StrictStr] = None
    seed: StrictInt = DEFAULT_SEED             # as `bitdance-rt generate`
    steps: Optional[StrictInt] = None
    guidance: Optional[Union[StrictInt, StrictFloat]] = None
    negative_prompt: Optional[StrictStr] = None
    stream: StrictBool = False
    user: Optional[StrictStr] = None


def parse_body(raw: bytes) -> ImagesBody:
    """The request body, or an ApiError: 400 for what is not a JSON object, 422 for a missing,
    unknown or wrongly typed field."""
    try:
        data = parse_json(raw, "the request body", max_depth=BODY_DEPTH, allow_nan=True,
                          fix="send a JSON object such as {\"prompt\": \"a lighthouse at dusk\"}")
    except BitDanceError as e:
        raise ApiError(400, str(e)) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON "
                       f"{type(data).__name__}; send {{\"prompt\": \"...\", ...}}")
    try:
        return ImagesBody.model_validate(data)
    except ValidationError as e:
        raise _type_error(e.errors()[0]) from None


def _type_error(err: dict) -> ApiError:
    loc = err.get("loc") or ("body",)
    field = str(loc[0])  # a union's member (guidance.int) is not the client's business
    kind = err.get("type", "")
    if kind == "missing":
        return ApiError(422, f"{field} is required", field)
    if kind == "extra_forbidden":
        known = ", ".join(ImagesBody.model_fields)
        return ApiError(422, f"unknown field {field!r}; the fields are: {known}", field)
    given = repr(err.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    what = _TYPE_NAMES.get(field, "a value of another type")
    return ApiError(422, f"{field} must be {what}, got {given}", field)


_TYPE_NAMES = {
    "prompt": "a string", "n": "an integer", "size": "a string like \"1024x1024\"",
    "response_format": "the string \"b64_json\"", "output_format": "the string \"png\"",
    "model": "a string", "seed": "an integer", "steps": "an integer",
    "guidance": "a number", "negative_prompt": "a string", "stream": "true or false",
    "user": "a string",
}


def size_text(height: int, width: int) -> str:
    """OpenAI's spelling of a size: width x height."""
    return f"{width}x{height}"


def to_request(body: ImagesBody, session, model_id: str) -> ImagePlan:
    """The plan of the library request ``body`` asks for, made by ``session.plan`` (every
    setting checked, the prompt's length included, the prompt tokenized: once, the plan then
    travels to the scheduler); ApiError 400 with the library's message otherwise."""
    if body.response_format != "b64_json":
        raise ApiError(400, f"response_format {body.response_format!r} is not supported: this "
                       "server returns images inline; use \"b64_json\"", "response_format")
    if body.output_format.lower() != "png":
        raise ApiError(400, f"output_format {body.output_format!r} is not supported; images "
                       "are PNG (with the settings in their metadata): use \"png\"",
                       "output_format")
    if body.model not in (None, model_id):
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves "
                       f"{model_id!r} (GET /v1/models), or leave model out", "model")
    if body.negative_prompt:
        raise ApiError(400, "negative_prompt is not supported by BitDance (its unguided "
                       "branch has no prompt); leave it out", "negative_prompt")
    height = width = None
    if body.size is not None and body.size != "auto":
        m = SIZE.match(body.size)
        if not m:
            raise ApiError(400, f"size must be \"WIDTHxHEIGHT\" in pixels, e.g. "
                           f"\"1024x1024\", got {body.size!r}", "size")
        width, height = int(m.group(1)), int(m.group(2))
    req = GenerationRequest(prompt=body.prompt, height=height, width=width, steps=body.steps,
                            guidance=None if body.guidance is None else float(body.guidance),
                            seed=body.seed, num_images=body.n)
    try:
        return session.plan(req)
    except UnsupportedSizeError:
        sizes = ", ".join(size_text(h, w) for h, w in session.spec.info.sizes)
        raise ApiError(400, f"size {body.size} (width x height) is not supported by this "
                       f"model; choose one of: {sizes}", "size") from None
    except BitDanceError as e:
        raise ApiError(400, str(e), _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    for word, param in (("prompt", "prompt"), ("number of images", "n"), ("steps", "steps"),
                        ("guidance", "guidance"), ("seed", "seed"), ("height", "size")):
        if word in message:
            return param
    return None
