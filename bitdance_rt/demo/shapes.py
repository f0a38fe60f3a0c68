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


# The ways the caption generator (:func:`phrase`) words a position; the first is the template's.
POSITION_WORDINGS = {
    "left": ("on the left", "on the left side", "to the left", "left"),
    "right": ("on the right", "on the right side", "to the right", "right"),
    "top": ("at the top", "top"),
    "bottom": ("at the bottom", "bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
P_TEMPLATE = 0.3               # a training caption is the template's, else a generated wording
P_CAPITAL = 0.3                # a generated wording starts with a capital letter
P_PERIOD = 0.3                 # ... ends with a period


def vocabulary() -> list[str]:
    """Every word a caption uses (the template's and the generator's), sorted."""
    words = {"a", "an", "and", "on", "background", "that", "is"}
    words.update(COLOURS)
    words.update(SHAPES)
    for wordings in POSITION_WORDINGS.values():
        for phrase in wordings:
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


# ----------------------------------------------------------------------------------------------
# The caption generator: the ways people write the template's captions
#
#   CAPTION  := BODY SEP BG_ON | BODY ", " BG_BARE | BG_ON ", " BODY | BG_BARE ", " BODY
#   BODY     := OBJECT | OBJECT JOIN OBJECT            JOIN := " and " | ", " | ", and "
#   OBJECT   := ART COLOUR SHAPE [" " POSITION] | ART SHAPE " that is " COLOUR [" " POSITION]
#   BG_ON    := "on " BG_BARE                          BG_BARE := ART COLOUR " background"
#   ART      := the right article ("an" before a vowel) | "a" | nothing
#   SEP      := ", " | " "
#   POSITION := one of POSITION_WORDINGS[position] (left: "on the left", "on the left side",
#               "to the left", "left"; centre: "in the centre", "in the center", "in the middle")
#
# then, independently, a capital first letter (P_CAPITAL) and a final period (P_PERIOD). Each
# choice is uniform over its options; a training caption is the template's with probability
# P_TEMPLATE. Every choice is drawn from a generator seeded by the sample's index, like its
# image. :func:`wordings` lists every wording of one set of attributes (case and punctuation
# aside); :func:`bitdance_rt.demo.detect.parse_caption` reads all of them.


def _compose(attrs: dict, pick) -> str:
    """One wording of ``attrs``; ``pick(options)`` makes every choice (see the grammar)."""

    def art(word: str) -> str:
        a = pick(sorted({article(word), "a", ""}))
        return f"{a} " if a else ""

    def obj(o: dict) -> str:
        if pick(("colour shape", "shape that is colour")) == "colour shape":
            text = f"{art(o['colour'])}{o['colour']} {o['shape']}"
        else:
            text = f"{art(o['shape'])}{o['shape']} that is {o['colour']}"
        if o.get("position"):
            text += " " + pick(POSITION_WORDINGS[o["position"]])
        return text

    body = obj(attrs["objects"][0])
    for o in attrs["objects"][1:]:
        body += pick((" and ", ", ", ", and ")) + obj(o)
    bg = attrs["background"]
    bare = f"{art(bg)}{bg} background"
    form = pick(("body bg", "body, bare", "bg, body", "bare, body"))
    if form == "body bg":
        return body + pick((", ", " ")) + "on " + bare
    if form == "body, bare":
        return f"{body}, {bare}"
    if form == "bg, body":
        return f"on {bare}, {body}"
    return f"{bare}, {body}"


def phrase(attrs: dict, rng: np.random.Generator) -> str:
    """A generated wording of ``attrs`` (the grammar above), with its surface choices."""
    text = _compose(attrs, lambda options: options[rng.integers(len(options))])
    if rng.random() < P_CAPITAL:
        text = text[0].upper() + text[1:]
    if rng.random() < P_PERIOD:
        text += "."
    return text


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: what tells two wordings apart."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def wordings(attrs: dict) -> set[str]:
    """Every wording :func:`phrase` can give for ``attrs``, normalized (:func:`normalize`)."""
    out, path = set(), []
    while True:
        counts, depth = [], [0]

        def pick(options):
            i = path[depth[0]] if depth[0] < len(path) else 0
            counts.append(len(options))
            depth[0] += 1
            return options[i]

        out.add(normalize(_compose(attrs, pick)))
        path = path + [0] * (len(counts) - len(path))
        # next choice sequence, odometer style (the last choice turns fastest)
        k = len(counts) - 1
        while k >= 0 and path[k] + 1 >= counts[k]:
            k -= 1
        if k < 0:
            return out
        path = path[:k] + [path[k] + 1]


def training_caption(index: int) -> str:
    """The caption training uses for sample ``index``: the template's or a generated wording."""
    attrs = draw_attributes(index)
    rng = np.random.default_rng([DATASET_SEED, int(index), 1])
    if rng.random() < P_TEMPLATE:
        return caption_of(attrs)
    return phrase(attrs, rng)


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
