"""A deterministic procedural dataset of captioned shape images (no downloads).

Each image shows one or two solid shapes (circle, square, triangle) in one of eight colours on a
plain background of another colour; captions follow a small fixed grammar::

    a red circle, on a white background
    a red circle on the left, on an orange background
    a red circle on the left and a blue square on the right, on a white background

(article "an" before "orange").

``sample(index, size)`` is seeded by ``index`` only, so the same index always gives the same
image, caption and attributes. Training uses indices ``0 .. TRAIN_INDICES - 1``; the held-out
evaluation prompts are ``heldout(n)``: indices from ``HELDOUT_START`` on, never used in training.
"""

from __future__ import annotations

import numpy as np

# Palette (RGB). Chosen so that every pair is far apart, the nearest-colour segmentation of the
# detector is unambiguous, and red / orange / yellow stay distinguishable.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 225),
    "yellow": (250, 225, 40),
    "orange": (250, 135, 20),
    "purple": (140, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Where a placed shape's centre goes (fractions of width, height), before jitter.
POSITION_CENTRE = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))

TRAIN_INDICES = 10**6          # training draws indices 0 .. TRAIN_INDICES - 1
VALIDATION_START = 5 * 10**8  # prompts to choose the released defaults on (not the held-out)
HELDOUT_START = 10**9          # held-out evaluation indices start here
DATASET_SEED = 20260613        # mixed with the index into numpy's SeedSequence

TRIANGLE_SCALE = 1.35          # triangle circumradius / r (about the area of the others)
P_TWO_SHAPES = 0.4
P_PLACED = 0.75                # a single shape's caption names its position


def vocabulary() -> list[str]:
    """Every word a caption uses, sorted."""
    words = {"a", "an", "and", "on", "background"}
    words.update(COLOURS)
    words.update(SHAPES)
    for phrase in POSITION_PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(attrs: dict) -> str:
    """The caption of an attributes dict (the grammar above)."""
    parts = []
    for obj in attrs["objects"]:
        text = f"{article(obj['colour'])} {obj['colour']} {obj['shape']}"
        if obj.get("position"):
            text += " " + POSITION_PHRASE[obj["position"]]
        parts.append(text)
    bg = attrs["background"]
    return " and ".join(parts) + f", on {article(bg)} {bg} background"


def draw_attributes(index: int) -> dict:
    """The random choices of sample ``index``: caption attributes plus the layout.

    ``{"background": colour, "objects": [{"shape", "colour", "position" (None when the caption
    does not say), "cx", "cy", "r"}]}``; cx, cy, r are fractions of the image width/height.
    """
    rng = np.random.default_rng([DATASET_SEED, int(index)])
    two = rng.random() < P_TWO_SHAPES
    n = 2 if two else 1
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[: n + 1]]
    background, obj_colours = colours[0], colours[1:]
    if two:
        positions = list(PAIRS[rng.integers(len(PAIRS))])
    else:
        positions = [POSITIONS[rng.integers(len(POSITIONS))] if rng.random() < P_PLACED else None]
    objects = []
    for colour, pos in zip(obj_colours, positions):
        shape = SHAPES[rng.integers(len(SHAPES))]
        if two:
            r = rng.uniform(0.13, 0.18)
        elif pos in (None, "centre"):
            r = rng.uniform(0.16, 0.24)
        else:
            r = rng.uniform(0.14, 0.19)
        if pos is None:  # unplaced: anywhere near the middle
            cx, cy = rng.uniform(0.4, 0.6, size=2)
        else:
            bx, by = POSITION_CENTRE[pos]
            jx, jy = rng.uniform(-0.04, 0.04, size=2)
            cx, cy = bx + jx, by + jy
        cx, cy = fit_inside(shape, float(cx), float(cy), float(r))
        objects.append({"shape": shape, "colour": colour, "position": pos,
                        "cx": cx, "cy": cy, "r": float(r)})
    return {"background": background, "objects": objects}


MARGIN = 0.02


def extents(shape: str, r: float) -> tuple[float, float, float, float]:
    """How far a shape reaches from its centre: (left, right, up, down), fractions."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        return 0.85 * r, 0.85 * r, 0.85 * r, 0.85 * r
    big = TRIANGLE_SCALE * r
    return big * np.sqrt(3) / 2, big * np.sqrt(3) / 2, big, big / 2


def fit_inside(shape: str, cx: float, cy: float, r: float) -> tuple[float, float]:
    """Move a centre (never across the middle) so that the whole shape is in the image."""
    left, right, up, down = extents(shape, r)
    cx = min(max(cx, MARGIN + left), 1 - MARGIN - right)
    cy = min(max(cy, MARGIN + up), 1 - MARGIN - down)
    return cx, cy


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of one shape (pixel centres inside it).

    circle: radius r; square: half side 0.85 r (axis aligned); triangle: upward, circumradius
    ``TRIANGLE_SCALE * r`` with its centroid at (cx, cy). Units: r is a fraction of
    min(H, W)."""
    s = min(height, width)
    ys = (np.arange(height) + 0.5)[:, None]
    xs = (np.arange(width) + 0.5)[None, :]
    x0, y0, rad = cx * width, cy * height, r * s
    if shape == "circle":
        return (xs - x0) ** 2 + (ys - y0) ** 2 <= rad**2
    if shape == "square":
        half = 0.85 * rad
        return (np.abs(xs - x0) <= half) & (np.abs(ys - y0) <= half)
    if shape == "triangle":
        big = TRIANGLE_SCALE * rad
        # vertices of an upward equilateral triangle with centroid (x0, y0)
        top = (x0, y0 - big)
        left = (x0 - big * np.sqrt(3) / 2, y0 + big / 2)
        right = (x0 + big * np.sqrt(3) / 2, y0 + big / 2)

        def side(a, b):  # >= 0 on the inner side for a clockwise (screen) ordering
            return (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])

        return (side(top, right) >= 0) & (side(right, left) >= 0) & (side(left, top) >= 0)
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict, size: int | tuple[int, int] = 256) -> np.ndarray:
    """uint8 ``[H, W, 3]`` image of an attributes dict (later objects drawn on top)."""
    height, width = (size, size) if isinstance(size, int) else size
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = PALETTE[attrs["background"]]
    for obj in attrs["objects"]:
        m = shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], height, width)
        img[m] = PALETTE[obj["colour"]]
    return img


def sample(index: int, size: int | tuple[int, int] = 256) -> tuple[np.ndarray, str, dict]:
    """``(uint8 [H, W, 3] image, caption, attributes)`` of sample ``index``."""
    attrs = draw_attributes(index)
    return render(attrs, size), caption_of(attrs), attrs


def caption_attributes(attrs: dict) -> dict:
    """Only what a caption says: ``{"background", "objects": [{"shape", "colour",
    "position"}]}`` (what :func:`bitdance_rt.demo.detect.parse_caption` returns)."""
    return {"background": attrs["background"],
            "objects": [{k: o[k] for k in ("shape", "colour", "position")}
                        for o in attrs["objects"]]}


def train_index(i: int) -> int:
    """Map any step counter to a training index (never a held-out one)."""
    return int(i) % TRAIN_INDICES


def heldout(n: int = 120, start: int | None = None) -> list[tuple[int, str, dict]]:
    """The fixed held-out evaluation prompts: ``(index, caption, caption attributes)``
    (``start``: another fixed range, e.g. :data:`VALIDATION_START`)."""
    out = []
    for k in range(n):
        idx = (HELDOUT_START if start is None else start) + k
        attrs = draw_attributes(idx)
        out.append((idx, caption_of(attrs), caption_attributes(attrs)))
    return out
