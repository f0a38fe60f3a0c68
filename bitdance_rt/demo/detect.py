"""A model-free detector and prompt-adherence scorer for the shapes dataset (a GenEval in
miniature).

It never uses the generative model. From an image:

1. every pixel gets the nearest of the eight palette colours;
2. the background is the most common colour of the border ring; an image where it covers
   less than ``MIN_BACKGROUND`` has no background and no objects (noise, photographs);
3. for each other colour, the mask is cleaned with a morphological opening (removes the thin
   rings of blended colours along edges) and split into connected components; components
   smaller than ``MIN_AREA`` of the image are ignored;
4. each component's shape is the nearest prototype in (fill ratio of its bounding box, downward
   offset of its centroid in the box): circle (pi/4, 0), square (1, 0), triangle (1/2, 1/6);
5. its position is read from its centroid (centre if within ``CENTRE_RADIUS`` of the middle,
   else left/right or top/bottom by the larger offset).

:func:`check` then compares the detection to a caption's attributes, attribute by attribute
(background; per object colour, shape and, when the caption states it, position), and
:func:`score` aggregates over many images, overall and per attribute kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, PALETTE, POSITION_PHRASE, POSITION_WORDINGS, SHAPES, normalize

KINDS = ("colour", "shape", "position", "background")
MIN_AREA = 0.006        # fraction of the image a component needs to count as an object
BORDER = 0.04           # width of the border ring that decides the background (fraction)
CENTRE_RADIUS = 0.12    # centroid within this (max-norm, fraction of size) of the middle: centre
# A caption's "on a COLOUR background" needs a background: the border's colour covering at
# least half the image. The dataset's images: >= 0.81 (objects cover at most a fifth); the
# demo model's 240 held-out images at guidance 4 and 1: >= 0.58 (a washed-out purple); pixel
# noise: about 0.23; smooth noise and random colour blocks: mostly below 0.5, a few up to
# 0.75 (tests/test_demo_detect.py). Below it, the image has no background and no objects:
# every attribute is wrong.
MIN_BACKGROUND = 0.5
# Shape prototypes in (fill ratio, centroid offset) space; the offset is weighted by OFFSET_W.
PROTOTYPES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 1 / 6)}
OFFSET_W = 2.0

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Captions


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_POS_RE = "|".join(re.escape(p) for p in POSITION_PHRASE.values())
_OBJECT_RE = rf"an? ({_COLOUR_RE}) ({_SHAPE_RE})(?: ({_POS_RE}))?"
_CAPTION_RE = re.compile(
    rf"^{_OBJECT_RE}(?: and {_OBJECT_RE})?,? on an? ({_COLOUR_RE}) background\.?$")
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASE.items()}

# The caption generator's grammar (bitdance_rt.demo.shapes, "The caption generator"), read on
# the normalized text (no case, no punctuation: commas and a final period do not matter).
_WORDING_TO_POS = {w: pos for pos, ws in POSITION_WORDINGS.items() for w in ws}
_ANY_POS_RE = "|".join(re.escape(w) for w in sorted(_WORDING_TO_POS, key=len, reverse=True))


_ART_RE = "(?:a |an (?=[aeiou]))?"   # "a", "an" before a vowel, or nothing (as the generator)


def _object_re(i: int) -> str:
    return (rf"{_ART_RE}(?:(?P<c{i}>{_COLOUR_RE}) (?P<s{i}>{_SHAPE_RE})"
            rf"|(?P<t{i}>{_SHAPE_RE}) that is (?P<d{i}>{_COLOUR_RE}))(?: (?P<p{i}>{_ANY_POS_RE}))?")


_BODY_RE = rf"{_object_re(1)}(?: (?:and )?{_object_re(2)})?"
_BG_RE = rf"(?:on )?{_ART_RE}(?P<bg>{_COLOUR_RE}) background"
_WORDING_RES = (re.compile(rf"^{_BODY_RE} {_BG_RE}$"), re.compile(rf"^{_BG_RE} {_BODY_RE}$"))


def _parse_wording(caption: str) -> dict | None:
    text = normalize(caption)
    m = _WORDING_RES[0].match(text) or _WORDING_RES[1].match(text)
    if not m:
        return None
    objects = []
    for i in (1, 2):
        colour, shape = m[f"c{i}"] or m[f"d{i}"], m[f"s{i}"] or m[f"t{i}"]
        if colour is None:
            continue
        objects.append({"shape": shape, "colour": colour,
                        "position": _WORDING_TO_POS[m[f"p{i}"]] if m[f"p{i}"] else None})
    return {"background": m["bg"], "objects": objects}


def parse_caption(caption: str) -> dict:
    """Caption -> ``{"background", "objects": [{"shape", "colour", "position"}]}``.

    Accepts the dataset's template (case and extra spaces are ignored) and every wording of
    the caption generator (``shapes.phrase``); raises ``ValueError`` naming the grammar
    otherwise."""
    text = " ".join(caption.lower().replace(" ,", ",").split())
    m = _CAPTION_RE.match(text)
    if not m:
        wording = _parse_wording(caption)
        if wording is not None:
            return wording
        raise ValueError(
            f"cannot read the caption {caption!r}: the shapes scorer understands "
            "'a COLOUR SHAPE [POSITION] [and a COLOUR SHAPE [POSITION]], on a COLOUR background' "
            f"with COLOUR in {list(COLOURS)}, SHAPE in {list(SHAPES)} and POSITION in "
            f"{list(POSITION_PHRASE.values())}")
    g = m.groups()
    objects = []
    for colour, shape, phrase in (g[0:3], g[3:6]):
        if colour is None:
            continue
        objects.append({"shape": shape, "colour": colour,
                        "position": _PHRASE_TO_POS[phrase] if phrase else None})
    return {"background": g[6], "objects": objects}


# ----------------------------------------------------------------------------------------------
# Detection


@dataclass
class Component:
    colour: str
    area: float          # fraction of the image
    cx: float            # centroid, fractions of width / height
    cy: float
    fill: float          # area / bounding-box area
    offset: float        # (centroid y - box centre y) / box height (triangles: ~ +1/6)
    shape: str
    position: str


def palette_labels(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[H, W]`` index of the nearest palette colour (RGB distance)."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    d = ((img[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def background_colour(labels: np.ndarray) -> str:
    h, w = labels.shape
    b = max(1, int(round(BORDER * min(h, w))))
    ring = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(),
                           labels[:, :b].ravel(), labels[:, -b:].ravel()])
    return COLOURS[int(np.bincount(ring, minlength=len(COLOURS)).argmax())]


def classify_shape(fill: float, offset: float) -> str:
    best, dist = "circle", float("inf")
    for name, (f0, o0) in PROTOTYPES.items():
        d = (fill - f0) ** 2 + (OFFSET_W * (offset - o0)) ** 2
        if d < dist:
            best, dist = name, d
    return best


def position_of(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_RADIUS:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _neighbourhood(a: np.ndarray, fill) -> list[np.ndarray]:
    """The 3x3 neighbourhood of every pixel as nine shifted views (``fill`` beyond the edge)."""
    h, w = a.shape
    p = np.pad(a, 1, constant_values=fill)
    return [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def binary_opening(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Erosion then dilation by a 3x3 square, ``iterations`` times each (outside: False)."""
    for _ in range(iterations):
        mask = np.logical_and.reduce(_neighbourhood(mask, False))
    for _ in range(iterations):
        mask = np.logical_or.reduce(_neighbourhood(mask, False))
    return mask


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of ``mask``: labels 1..n in raster order of their first pixel
    (0: background), and n. Each pixel takes its neighbourhood's smallest index until stable."""
    h, w = mask.shape
    none = h * w
    index = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        smallest = np.where(mask, np.minimum.reduce(_neighbourhood(index, none)), none)
        if np.array_equal(smallest, index):
            break
        index = smallest
    roots, inverse = np.unique(index[mask], return_inverse=True)
    labels = np.zeros((h, w), dtype=np.int64)
    labels[mask] = inverse + 1
    return labels, len(roots)


def detect(image: np.ndarray) -> dict:
    """``{"background": colour, "objects": [Component, ...]}``, objects largest first; an
    image without a background (its border's colour covers less than ``MIN_BACKGROUND`` of
    it: noise, a photograph, a close-up) has background None and no objects."""
    labels = palette_labels(image)
    h, w = labels.shape
    bg = background_colour(labels)
    if (labels == COLOURS.index(bg)).mean() < MIN_BACKGROUND:
        return {"background": None, "objects": []}
    opening = max(1, int(round(min(h, w) / 128)))  # 1 px at 128, 2 px at 256
    found = []
    for ci, colour in enumerate(COLOURS):
        if colour == bg:
            continue
        mask = labels == ci
        if mask.sum() < MIN_AREA * h * w:
            continue
        mask = binary_opening(mask, opening)
        comp, n = label_components(mask)
        if n == 0:
            continue
        areas = np.bincount(comp.ravel())[1:]
        for k in np.nonzero(areas >= MIN_AREA * h * w)[0]:
            ys, xs = np.nonzero(comp == k + 1)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            area = float(len(ys))
            cy_px, cx_px = ys.mean() + 0.5, xs.mean() + 0.5
            fill = area / float((y1 - y0) * (x1 - x0))
            offset = (cy_px - (y0 + y1) / 2) / (y1 - y0)
            cx, cy = cx_px / w, cy_px / h
            found.append(Component(colour, area / (h * w), cx, cy, fill, offset,
                                   classify_shape(fill, offset), position_of(cx, cy)))
    found.sort(key=lambda c: -c.area)
    return {"background": bg, "objects": found}


# ----------------------------------------------------------------------------------------------
# Checking and scoring


def _as_attributes(caption_or_attrs) -> dict:
    if isinstance(caption_or_attrs, str):
        return parse_caption(caption_or_attrs)
    return caption_or_attrs


def check(image: np.ndarray, caption_or_attrs) -> list[dict]:
    """Per-attribute results ``[{"kind", "object", "expected", "found", "ok"}]``.

    Each caption object is matched to the largest unmatched component of its colour (colour
    right); failing that, to the largest unmatched component of any colour (colour wrong, its
    shape and position still judged); with no component left, every attribute of it is wrong.
    """
    attrs = _as_attributes(caption_or_attrs)
    det = detect(image)
    results = [{"kind": "background", "object": None, "expected": attrs["background"],
                "found": det["background"], "ok": det["background"] == attrs["background"]}]
    free = list(det["objects"])
    matched: list[Component | None] = []
    for obj in attrs["objects"]:
        same = [c for c in free if c.colour == obj["colour"]]
        comp = same[0] if same else None
        matched.append(comp)
        if comp is not None:
            free.remove(comp)
    for i, obj in enumerate(attrs["objects"]):
        if matched[i] is None and free:
            matched[i] = free.pop(0)
    for i, (obj, comp) in enumerate(zip(attrs["objects"], matched)):
        kinds = [("colour", "colour"), ("shape", "shape")]
        if obj.get("position"):
            kinds.append(("position", "position"))
        for kind, key in kinds:
            got = getattr(comp, key) if comp is not None else None
            results.append({"kind": kind, "object": i, "expected": obj[key], "found": got,
                            "ok": got == obj[key]})
    return results


def score(images, captions) -> dict:
    """Fraction of caption attributes the images show: ``{"overall", "by_kind": {kind:
    fraction}, "counts": {kind: attributes}, "all_right": fraction of images with every
    attribute right, "images": n, "details": [per-image check() lists]}``."""
    images = list(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    right = {k: 0 for k in KINDS}
    total = {k: 0 for k in KINDS}
    details, perfect = [], 0
    for img, cap in zip(images, captions):
        res = check(np.asarray(img), cap)
        details.append(res)
        perfect += all(r["ok"] for r in res)
        for r in res:
            total[r["kind"]] += 1
            right[r["kind"]] += bool(r["ok"])
    n_all = sum(total.values())
    return {
        "overall": sum(right.values()) / n_all if n_all else float("nan"),
        "by_kind": {k: right[k] / total[k] if total[k] else float("nan") for k in KINDS},
        "counts": total,
        "all_right": perfect / len(images) if images else float("nan"),
        "images": len(images),
        "details": details,
    }


def format_score(result: dict) -> str:
    """One line: overall and per kind."""
    parts = [f"overall {result['overall']:.3f}"]
    parts += [f"{k} {result['by_kind'][k]:.3f}" for k in KINDS if result["counts"][k]]
    parts.append(f"all-right images {result['all_right']:.3f} of {result['images']}")
    return ", ".join(parts)


def format_details(details: list[dict]) -> str:
    """One image's :func:`check` results, e.g. ``colour1 red: ok, shape1 circle: saw square``."""
    return ", ".join(f"{r['kind']}{'' if r['object'] is None else r['object'] + 1} "
                     f"{r['expected']}: {'ok' if r['ok'] else 'saw ' + str(r['found'])}"
                     for r in details)
