"""What a caller asks for (:class:`GenerationRequest`) and what the AR loop runs
(:class:`ImagePlan`): the token sequences of every row, the latent size, the sampler settings.

Requests are validated here, before any weights are read, with one-line errors that name the
setting and the fix. Several requests with the same size, steps and guidance can share one plan
(one AR run): each keeps its own prompt and its own random numbers (see
:class:`~bitdance_rt.sampling.NoiseSource`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .errors import BitDanceError, RequestError
from .limits import (DEFAULT_SEED, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS,
                     MIN_GUIDANCE)
from .spec import RELEASED_SIZES, Defaults, ModelSpec, check_size



def conditional_text(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


UNCONDITIONAL_TEXT = "<|im_start|>assistant\n"


def sequence_ids(tokenizer, text: str, h: int, w: int, parallel_num: int) -> tuple[int, ...]:
    """Text tokens, ``<|vision_start|>``, ``<|res_h|>``, ``<|res_w|>``, P-1 query tokens."""
    image = ["<|vision_start|>", f"<|res_{h}|>", f"<|res_{w}|>"]
    image += [f"<|query_{i}|>" for i in range(1, parallel_num)]
    return tuple(tokenizer.encode(text)) + tuple(tokenizer.token_id(t) for t in image)


def unknown_words(spec: ModelSpec, prompt: str) -> list[str]:
    """The prompt's words outside the vocabulary a small model declares (none for the released
    models): the tokenizer still encodes them, but the model never saw them in training."""
    known = set(spec.info.vocabulary)
    if not known:
        return []
    return sorted({w for w in re.findall(r"[a-z]+", prompt.lower())} - known)


def check_text(prompt: str) -> None:
    """Refuse a prompt that is not text the tokenizer can take: characters that no UTF-8 text
    holds (lone surrogates, which is what bytes that are not UTF-8 become on a command line)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start]
        raise RequestError(
            f"the prompt holds U+{ord(bad):04X} at character {e.start}, which is not text "
            + ("(a byte that is not UTF-8, as passed on the command line)" if 0xDC80 <= ord(bad)
               <= 0xDCFF else "(a lone surrogate)")
            + "; give the prompt as UTF-8 text") from None


def check_numbers(num_images, steps, guidance, seed, steps_note: str) -> None:
    """The numbers of a request of either family, within the limits of :mod:`limits`
    (:class:`RequestError`, one line; ``steps_note`` says the usual step counts)."""
    if not (isinstance(num_images, int) and 1 <= num_images <= MAX_IMAGES):
        raise RequestError(f"the number of images must be between 1 and {MAX_IMAGES}, got "
                           f"{num_images!r}")
    if not (isinstance(steps, int) and 1 <= steps <= MAX_STEPS):
        raise RequestError(f"steps must be between 1 and {MAX_STEPS} ({steps_note}), got "
                           f"{steps!r}")
    g = guidance
    if (not isinstance(g, (int, float)) or not math.isfinite(g)
            or not MIN_GUIDANCE <= g <= MAX_GUIDANCE):
        raise RequestError(f"guidance must be a number from 1.0 (no guidance) to "
                           f"{MAX_GUIDANCE:g}, got {g!r}")
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise RequestError(f"the seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, ``num_images`` images. ``None`` settings take the model's defaults
    (:meth:`resolved`); the released models' are 1024x1024, 50 steps, guidance 7.5."""

    prompt: str
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = DEFAULT_SEED
    num_images: int = 1

    def resolved(self, spec: ModelSpec | None = None) -> "GenerationRequest":
        """This request with every unset setting taken from the model's defaults."""
        if self.is_resolved:
            return self
        d = spec.info.defaults if spec is not None else Defaults()
        return replace(self, height=d.height if self.height is None else self.height,
                       width=d.width if self.width is None else self.width,
                       steps=d.steps if self.steps is None else self.steps,
                       guidance=d.guidance if self.guidance is None else self.guidance)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.height, self.width, self.steps, self.guidance)

    def validate(self, spec: ModelSpec | None = None) -> tuple[int, int]:
        """Check every setting (``spec``: the model's sizes and defaults, else the released
        models'); returns the latent (h, w). Raises :class:`RequestError` (one line)."""
        r = self if self.is_resolved else self.resolved(spec)
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise RequestError("the prompt is empty; describe the image to draw")
        check_text(r.prompt)
        check_numbers(r.num_images, r.steps, r.guidance, r.seed,
                      "50 is the authors' setting, 25 the fast one")
        if not (isinstance(r.height, int) and isinstance(r.width, int)):
            raise RequestError(f"height and width must be integers, got {r.height!r}x{r.width!r}")
        sizes = spec.info.sizes if spec is not None else RELEASED_SIZES
        return check_size(r.height, r.width, sizes)

    @property
    def cfg(self) -> bool:
        return self.guidance is not None and self.guidance > 1.0


@dataclass(frozen=True)
class ImagePlan:
    """One AR run: B images of one size, each with its own conditional sequence, and with
    guidance one unconditional sequence shared by all (rows: B conditional, then B
    unconditional).

    A request is planned once (:func:`plan_for`: its settings resolved and checked, its prompt
    tokenized) and the plan travels: the CLI, :meth:`Session.generate
    <bitdance_rt.runtime.session.Session.generate>` and the server's scheduler pass it along,
    and several requests' plans join into one run with :meth:`merge`. ``requests`` holds the
    resolved requests the plan was made of, in order (their seeds and image counts)."""

    h: int                          # latent rows
    w: int                          # latent columns
    cond_ids: tuple                 # one token id tuple per image (B)
    uncond_ids: tuple | None        # the unconditional sequence when guidance is on
    steps: int                      # head sampling steps N
    guidance: float
    requests: tuple = ()            # the resolved GenerationRequests, in order

    @property
    def seeds(self) -> list[tuple[int, int]]:
        """``(seed, images)`` per request: what a NoiseSource draws for."""
        return [(r.seed, r.num_images) for r in self.requests]

    @property
    def request(self) -> "GenerationRequest":
        """The request of a one-request plan."""
        if len(self.requests) != 1:
            raise ValueError(f"this plan holds {len(self.requests)} requests, not one")
        return self.requests[0]

    @classmethod
    def merge(cls, *plans: "ImagePlan") -> "ImagePlan":
        """One run of several plans (of the same size, steps and guidance), in order."""
        first = plans[0]
        for p in plans[1:]:
            if (p.h, p.w, p.steps, p.guidance, p.uncond_ids) != (
                    first.h, first.w, first.steps, first.guidance, first.uncond_ids):
                raise BitDanceError("requests in one batch must have the same size, steps and "
                                    "guidance")
        if len(plans) == 1:
            return first
        return replace(first, cond_ids=sum((p.cond_ids for p in plans), ()),
                       requests=sum((p.requests for p in plans), ()))

    @property
    def images(self) -> int:
        return len(self.cond_ids)

    @property
    def cfg(self) -> bool:
        return self.uncond_ids is not None

    @property
    def rows(self) -> int:
        """Sequences in the LLM batch (S = 2B with guidance, else B)."""
        return self.images * (2 if self.cfg else 1)

    def row_ids(self) -> list[tuple]:
        """The token ids of every row: conditional rows, then unconditional ones."""
        return list(self.cond_ids) + ([self.uncond_ids] * self.images if self.cfg else [])

    def groups(self) -> list[tuple[int, int, tuple]]:
        """Runs of consecutive rows with the same sequence: ``(start, end, ids)``."""
        return row_groups(self.row_ids())

    def max_len(self, parallel_num: int) -> int:
        """KV slots per sequence: the longest prompt plus every image block but the last."""
        return max(len(s) for s in self.row_ids()) + self.h * self.w - parallel_num

    @property
    def tokens(self) -> int:
        return self.h * self.w


def row_groups(rows: list) -> list[tuple[int, int, tuple]]:
    """Runs of consecutive equal sequences in ``rows``: ``(start, end, ids)`` (a prompt's rows
    run through the LLM together, at the prompt's exact length)."""
    out = []
    for i, ids in enumerate(rows):
        if out and out[-1][2] == ids:
            out[-1] = (out[-1][0], i + 1, ids)
        else:
            out.append((i, i + 1, ids))
    return out


def plan_for(model, *requests: GenerationRequest) -> ImagePlan:
    """The plan of one or more requests on a model with a tokenizer (its configs suffice:
    ``load_checkpoint(..., weights=False)``). Each request is resolved against the model's
    defaults, checked and tokenized here, once. Several requests share one plan only if they
    have the same size, steps and guidance."""
    return ImagePlan.merge(*[_plan_one(model, r) for r in requests])


def _plan_one(model, request: GenerationRequest) -> ImagePlan:
    spec, tok = model.spec, model.tokenizer
    if tok is None:
        raise BitDanceError("this model has no tokenizer; load it from a checkpoint directory")
    r = request.resolved(spec)
    h, w = r.validate(spec)
    p = spec.parallel_num
    ids = sequence_ids(tok, conditional_text(r.prompt), h, w, p)
    uncond = _unconditional_ids(tok, h, w, p) if r.cfg else None
    plan = ImagePlan(h=h, w=w, cond_ids=(ids,) * r.num_images, uncond_ids=uncond,
                     steps=r.steps, guidance=float(r.guidance), requests=(r,))
    check_context(plan, spec)
    return plan


def _unconditional_ids(tok, h: int, w: int, p: int) -> tuple:
    """The unconditional sequence of a size, tokenized once per tokenizer."""
    cache = tok.__dict__.setdefault("_bitdance_uncond", {})
    if (h, w, p) not in cache:
        cache[(h, w, p)] = sequence_ids(tok, UNCONDITIONAL_TEXT, h, w, p)
    return cache[(h, w, p)]


def shortest_context(spec: ModelSpec, tokenizer=None, sizes=None) -> int:
    """The KV slots per sequence (:meth:`ImagePlan.max_len`) that the largest of ``sizes``
    (default: every size the model declares) needs with the shortest prompt (one character,
    with guidance): the least ``--max-seq`` an export of the model can have. Without a
    tokenizer the prompt's chat template is not counted (a lower bound)."""
    p = spec.parallel_num
    h, w = max((check_size(hh, ww, spec.info.sizes) for hh, ww in (sizes or spec.info.sizes)),
               key=lambda hw: hw[0] * hw[1])
    if tokenizer is None:
        cond, uncond = (0,) * (3 + p), None
    else:
        cond = sequence_ids(tokenizer, conditional_text("x"), h, w, p)
        uncond = _unconditional_ids(tokenizer, h, w, p)
    plan = ImagePlan(h=h, w=w, cond_ids=(cond,), uncond_ids=uncond, steps=1, guidance=2.0)
    return plan.max_len(p)


def check_context(plan: ImagePlan, spec: ModelSpec) -> None:
    """Refuse a prompt that, with the image, does not fit the model's positions."""
    need = plan.max_len(spec.parallel_num) + spec.parallel_num
    limit = spec.llm.max_position_embeddings
    if need > limit:
        longest = max(len(s) for s in plan.cond_ids)
        raise RequestError(
            f"the prompt is {longest} tokens long and the image needs {plan.tokens}: "
            f"{need} positions in all, more than this model's {limit}; shorten the prompt")
