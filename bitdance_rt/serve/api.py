"""The OpenAI Images API request body and its translation into a
:class:`~bitdance_rt.request.GenerationRequest` (text-to-image models) or a
:class:`~bitdance_rt.imagenet.request.ClassRequest` (class-conditional ImageNet models: the
class in ``class``, or in ``prompt`` for OpenAI-style clients), with every error a client can
cause turned into an :class:`ApiError` (status, one-line message, the field at fault).

Types are checked here (422); values by the library (``Session.plan``: the CLI's own
messages, 400), so a bad request never reaches the model.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError

from ..errors import BitDanceError, UnsupportedSizeError
from ..files import parse_json
from ..limits import DEFAULT_SEED
from ..request import GenerationRequest, ImagePlan

BODY_DEPTH = 4  # a request body is one flat object; deeper nesting is refused unparsed
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
T2I, IMAGENET = "text-to-image", "imagenet"   # the model families a server may hold
MAX_CLASS_TEXT = 100  # a class name is at most 30 characters; longer is no class (nor echoed)


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
    and ``stream`` (progress as server-sent events), and for class-conditional models
    ``class`` (an index or a class name). Which of ``prompt`` and ``class`` a server needs
    depends on its model (:func:`check_fields`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[StrictStr] = None
    class_: Optional[Union[StrictInt, StrictStr]] = Field(None, alias="class")
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


def parse_body(raw: bytes, family: str = T2I) -> ImagesBody:
    """The request body, or an ApiError: 400 for what is not a JSON object, 422 for a missing,
    unknown or wrongly typed field; ``family``: the served model's (:func:`check_fields`)."""
    try:
        data = parse_json(raw, "the request body", max_depth=BODY_DEPTH, allow_nan=True,
                          fix="send a JSON object such as {\"prompt\": \"a lighthouse at dusk\"}")
    except BitDanceError as e:
        raise ApiError(400, str(e)) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON "
                       f"{type(data).__name__}; send {{\"prompt\": \"...\", ...}}")
    try:
        body = ImagesBody.model_validate(data)
    except ValidationError as e:
        raise _type_error(e.errors()[0]) from None
    check_fields(body, family)
    return body


def check_fields(body: ImagesBody, family: str) -> None:
    """What a model of ``family`` takes: a text-to-image model a ``prompt`` (never a
    ``class``); a class-conditional one a ``class``, or a ``prompt`` that holds one."""
    if family == IMAGENET:
        if body.class_ is None and body.prompt is None:
            raise ApiError(422, "class is required: this server's model is class-conditional "
                           "(ImageNet); send \"class\": an index such as 207 or a class name "
                           "such as \"golden retriever\" (or put it in prompt)", "class")
        if body.class_ is not None and body.prompt is not None:
            raise ApiError(400, "give the class in class or in prompt, not both: this "
                           "server's model is class-conditional (ImageNet) and takes no text",
                           "prompt")
        return
    if body.class_ is not None:
        raise ApiError(400, "class is for class-conditional ImageNet models; this server's "
                       "model is text-to-image: describe the image in prompt and leave class "
                       "out", "class")
    if body.prompt is None:
        raise ApiError(422, "prompt is required", "prompt")


def _type_error(err: dict) -> ApiError:
    loc = err.get("loc") or ("body",)
    field = str(loc[0])  # a union's member (guidance.int) is not the client's business
    kind = err.get("type", "")
    if kind == "missing":
        return ApiError(422, f"{field} is required", field)
    if kind == "extra_forbidden":
        known = ", ".join(f.alias or name for name, f in ImagesBody.model_fields.items())
        return ApiError(422, f"unknown field {field!r}; the fields are: {known}", field)
    given = repr(err.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    what = _TYPE_NAMES.get(field, "a value of another type")
    return ApiError(422, f"{field} must be {what}, got {given}", field)


_TYPE_NAMES = {
    "prompt": "a string", "class": "an integer (a class index) or a string (a class name)",
    "n": "an integer", "size": "a string like \"1024x1024\"",
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
    travels to the scheduler); ApiError 400 with the library's message otherwise. A
    class-conditional session (``family`` "imagenet") gets a class request
    (:func:`to_class_request`)."""
    height, width = _common(body, model_id)
    if getattr(session, "family", None) == IMAGENET:
        return to_class_request(body, session, height, width)
    check_fields(body, T2I)
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


def to_class_request(body: ImagesBody, session, height: int | None, width: int | None):
    """The plan of a class-conditional request (an
    :class:`~bitdance_rt.imagenet.serving.ImageNetSession`'s): the class from ``class`` or
    ``prompt``, the model's own size or none, the library's checks and messages (400, naming
    the field)."""
    from ..imagenet.request import ClassRequest

    check_fields(body, IMAGENET)
    side = session.image_size
    if height is not None and (height, width) != (side, side):
        raise ApiError(400, f"size {body.size} (width x height) is not supported by this "
                       f"model; it makes {size_text(side, side)} images only: send that size "
                       "or leave size out", "size")
    field, label = ("class", body.class_) if body.class_ is not None else ("prompt", body.prompt)
    if len(str(label)) > MAX_CLASS_TEXT:  # not echoed
        got = (f"a number of {len(str(label))} digits" if isinstance(label, int)
               else f"a text of {len(label)} characters")
        raise ApiError(400, f"{field} must be a class index (0 to {session.num_classes - 1}) "
                       f"or an ImageNet class name, got {got}", field)
    req = ClassRequest(label, num_images=body.n, seed=body.seed, steps=body.steps,
                       guidance=None if body.guidance is None else float(body.guidance))
    try:
        return session.plan(req)
    except BitDanceError as e:
        message = str(e)
        if message.startswith("--class "):  # the CLI's flag; here: the field it came in
            raise ApiError(400, f"{field} {message[len('--class '):]}", field) from None
        raise ApiError(400, message, _param_of(message)) from None


def _common(body: ImagesBody, model_id: str) -> tuple[int | None, int | None]:
    """The checks of every family; the size asked for as (height, width), or Nones."""
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
    return height, width


def _param_of(message: str) -> str | None:
    for word, param in (("prompt", "prompt"), ("number of images", "n"), ("steps", "steps"),
                        ("guidance", "guidance"), ("seed", "seed"), ("height", "size")):
        if word in message:
            return param
    return None
