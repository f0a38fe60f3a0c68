"""The model-free detector and scorer: right on the dataset's own images, low on wrong
captions, tolerant of the blur a decoder adds."""

import numpy as np
import pytest

from bitdance_rt.demo import detect, shapes


def _set(n, size, start=0):
    imgs, caps = [], []
    for i in range(start, start + n):
        img, cap, _ = shapes.sample(i, size)
        imgs.append(img)
        caps.append(cap)
    return imgs, caps


@pytest.mark.parametrize("size", [128, pytest.param(256, marks=pytest.mark.slow)])
def test_ground_truth_scores_high(size):
    imgs, caps = _set(150, size)
    res = detect.score(imgs, caps)
    assert res["overall"] >= 0.98
    for kind in detect.KINDS:
        assert res["by_kind"][kind] >= 0.97, (kind, res["by_kind"])
    # heldout prompts as well
    held = [shapes.sample(idx, size) for idx, _, _ in shapes.heldout(100)]
    assert detect.score([h[0] for h in held], [h[1] for h in held])["overall"] >= 0.98


def test_mismatched_captions_score_low():
    imgs, caps = _set(150, 128)
    shifted = caps[1:] + caps[:1]
    res = detect.score(imgs, shifted)
    assert res["overall"] < 0.4
    assert res["all_right"] < 0.05


def test_single_attribute_changes_are_caught():
    img, cap, attrs = shapes.sample(4, 128)  # "a blue triangle in the centre, on a white ..."
    a = shapes.caption_attributes(attrs)
    assert all(r["ok"] for r in detect.check(img, a))
    for key, value in (("colour", "red"), ("shape", "circle"), ("position", "left")):
        wrong = {"background": a["background"], "objects": [dict(a["objects"][0], **{key: value})]}
        res = {r["kind"]: r["ok"] for r in detect.check(img, wrong)}
        assert not res[key] and sum(res.values()) == len(res) - 1, (key, res)
    wrong_bg = dict(a, background="black")
    res = {r["kind"]: r["ok"] for r in detect.check(img, wrong_bg)}
    assert not res["background"]


@pytest.mark.parametrize("seed", [0])
def test_blurred_and_noisy_images_still_score_high(seed):
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    imgs, caps = _set(100, 128, start=1000)
    soft = []
    for img in imgs:
        blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5))
        x = np.asarray(blurred).astype(np.float32)
        x += rng.normal(0, 8, x.shape)
        soft.append(np.clip(x, 0, 255).astype(np.uint8))
    res = detect.score(soft, caps)
    assert res["overall"] >= 0.95, f"seed {seed}: {detect.format_score(res)}"


def _noise(kind: str, rng, size: int) -> np.ndarray:
    from PIL import Image

    if kind == "pixels":
        return rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    if kind == "gaussian":
        x = rng.normal(rng.uniform(0, 255), rng.uniform(60, 100), (size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8)
    k = int(rng.integers(4, 17) if kind == "smooth" else rng.integers(3, 9))
    small = Image.fromarray(rng.integers(0, 256, (k, k, 3)).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BILINEAR if kind == "smooth"
                                   else Image.NEAREST))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_scores_nothing(seed):
    """Noise of several kinds (pixels, wide gaussian, smooth colour fields, random colour
    blocks) at random sizes, against random held-out captions: it shows no background, so no
    objects (MIN_BACKGROUND); almost no attribute is right."""
    rng = np.random.default_rng(seed)
    captions = [c for _, c, _ in shapes.heldout(120)]
    for kind in ("pixels", "gaussian", "smooth", "blocks"):
        imgs = [_noise(kind, rng, int(rng.choice([64, 128, 256]))) for _ in range(15)]
        caps = [captions[int(rng.integers(len(captions)))] for _ in imgs]
        res = detect.score(imgs, caps)
        worst = max(sum(a["ok"] for a in d) / len(d) for d in res["details"])
        assert res["overall"] <= 0.05 and worst <= 0.5, \
            f"seed {seed}, {kind}: {detect.format_score(res)}, best image {worst:.2f}"
        if kind == "pixels":
            assert all(detect.detect(i)["background"] is None for i in imgs), f"seed {seed}"


def test_empty_image_gets_only_the_background():
    img = np.zeros((128, 128, 3), np.uint8)
    img[:] = shapes.PALETTE["green"]
    res = detect.check(img, "a red circle on the left, on a green background")
    assert [r["ok"] for r in res] == [True, False, False, False]


def test_parse_caption():
    a = detect.parse_caption("A red circle on the left and an orange square on the right, "
                             "on a white background.")
    assert a == {"background": "white", "objects": [
        {"shape": "circle", "colour": "red", "position": "left"},
        {"shape": "square", "colour": "orange", "position": "right"}]}
    assert detect.parse_caption("a black triangle, on a yellow background")["objects"][0][
        "position"] is None
    with pytest.raises(ValueError, match="COLOUR SHAPE"):
        detect.parse_caption("a lighthouse at dusk")


def _flood_fill_components(mask):
    """Independent 8-connected labelling: breadth-first flood fill in raster order."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = [(y, x)]
                while queue:
                    cy, cx = queue.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            inside = 0 <= ny < h and 0 <= nx < w
                            if inside and mask[ny, nx] and not labels[ny, nx]:
                                labels[ny, nx] = n
                                queue.append((ny, nx))
    return labels, n


@pytest.mark.parametrize("seed", [0, 1])
def test_components_and_opening_against_plain_loops(seed):
    rng = np.random.default_rng(seed)
    for k in range(20):
        shape = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        mask = rng.random(shape) < rng.uniform(0.2, 0.7)
        why = f"seed {seed}, mask {k} ({shape[0]}x{shape[1]})"
        labels, n = detect.label_components(mask)
        want, m = _flood_fill_components(mask)
        assert n == m and np.array_equal(labels, want), why
        # opening by a 3x3 square: a pixel survives if some 3x3 square of set pixels, wholly
        # inside the image, covers it
        h, w = mask.shape
        full = np.zeros_like(mask)
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                if mask[y - 1:y + 2, x - 1:x + 2].all():
                    full[y - 1:y + 2, x - 1:x + 2] = True
        assert np.array_equal(detect.binary_opening(mask, 1), full), why
