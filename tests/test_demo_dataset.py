"""The procedural shapes dataset: determinism, captions that match the pictures, the split."""

import numpy as np
import pytest

from bitdance_rt.demo import shapes
from bitdance_rt.demo.detect import parse_caption


def test_same_index_same_sample():
    for i in (0, 7, 12345, shapes.HELDOUT_START + 3):
        a_img, a_cap, a_attrs = shapes.sample(i, 128)
        b_img, b_cap, b_attrs = shapes.sample(i, 128)
        assert np.array_equal(a_img, b_img)
        assert a_cap == b_cap and a_attrs == b_attrs


def test_samples_vary_and_have_the_requested_size():
    caps = {shapes.sample(i, 64)[1] for i in range(50)}
    assert len(caps) > 40
    img, _, _ = shapes.sample(3, (96, 160))
    assert img.shape == (96, 160, 3) and img.dtype == np.uint8


def test_captions_match_attributes_and_pixels():
    vocab = set(shapes.vocabulary())
    counts = {"two": 0, "placed": 0, "unplaced": 0}
    for i in range(300):
        img, cap, attrs = shapes.sample(i, 128)
        # the caption says exactly the attributes, in the fixed grammar
        assert cap == shapes.caption_of(attrs)
        assert parse_caption(cap) == shapes.caption_attributes(attrs)
        assert set(cap.replace(",", "").split()) <= vocab
        objs = attrs["objects"]
        assert 1 <= len(objs) <= 2
        colours = [o["colour"] for o in objs]
        assert attrs["background"] not in colours and len(set(colours)) == len(colours)
        counts["two"] += len(objs) == 2
        counts["placed"] += len(objs) == 1 and objs[0]["position"] is not None
        counts["unplaced"] += len(objs) == 1 and objs[0]["position"] is None
        # the picture: the background colour on the border, each shape's colour at its centre
        bg = np.array(shapes.PALETTE[attrs["background"]])
        assert (img[0] == bg).all() and (img[-1] == bg).all()
        for o in objs:
            y, x = int(o["cy"] * 128), int(o["cx"] * 128)
            assert (img[y, x] == shapes.PALETTE[o["colour"]]).all()
        # only palette colours
        pal = np.array(list(shapes.PALETTE.values()))
        flat = np.unique(img.reshape(-1, 3), axis=0)
        assert all((pal == c).all(1).any() for c in flat)
    assert min(counts.values()) > 20  # every caption form occurs


def test_positions_put_shapes_where_captions_say():
    for i in range(300):
        attrs = shapes.draw_attributes(i)
        for o in attrs["objects"]:
            if o["position"] == "left":
                assert o["cx"] < 0.35
            elif o["position"] == "right":
                assert o["cx"] > 0.65
            elif o["position"] == "top":
                assert o["cy"] < 0.35
            elif o["position"] == "bottom":
                assert o["cy"] > 0.65
            elif o["position"] == "centre":
                assert abs(o["cx"] - 0.5) < 0.05 and abs(o["cy"] - 0.5) < 0.05


def test_heldout_split_is_fixed_and_disjoint_from_training():
    held = shapes.heldout(120)
    assert len(held) == 120 and held == shapes.heldout(120)
    assert all(idx >= shapes.TRAIN_INDICES for idx, _, _ in held)
    assert all(shapes.train_index(i) < shapes.TRAIN_INDICES for i in (0, 10**6, 10**9 + 5))
    assert len({cap for _, cap, _ in held}) > 100


def test_vocabulary():
    vocab = shapes.vocabulary()
    for w in ("red", "orange", "circle", "triangle", "left", "centre", "background", "an"):
        assert w in vocab
    assert vocab == sorted(set(vocab))


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shape_masks_have_the_expected_fill(shape):
    m = shapes.shape_mask(shape, 0.5, 0.5, 0.2, 200, 200)
    ys, xs = np.nonzero(m)
    fill = m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[shape]
    assert abs(fill - expected) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_generator_wordings_read_back(seed):
    """Every wording the caption generator can give (all of them, enumerated) reads back as its
    attributes, and the sampled training captions are among them, in the vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = set(shapes.vocabulary())
    for index in rng.integers(0, shapes.TRAIN_INDICES, size=12):
        attrs = shapes.draw_attributes(int(index))
        want = shapes.caption_attributes(attrs)
        every = shapes.wordings(attrs)
        assert len(every) >= 20, (seed, index)
        for w in every:
            assert parse_caption(w) == want, (seed, index, w)
            assert set(w.split()) <= vocab, (seed, index, w)
        for k in range(20):
            text = shapes.phrase(attrs, np.random.default_rng([seed, k]))
            assert shapes.normalize(text) in every, (seed, index, text)
            assert parse_caption(text) == want, (seed, index, text)


def test_training_captions_mix_the_template_and_the_issue_wordings():
    caps = [shapes.training_caption(i) for i in range(3000)]
    assert caps == [shapes.training_caption(i) for i in range(3000)]   # seeded by the index
    template = sum(c == shapes.sample(i, 8)[1] for i, c in enumerate(caps)) / len(caps)
    assert abs(template - shapes.P_TEMPLATE) < 0.05 + 0.05, template
    text = "\n".join(caps)
    # the ways people write that the generator must cover
    for needle in (" in the middle", " in the center", " on the left side", " to the left",
                   "that is ", "\nOn ", "\nA ", ".\n", " a orange", "\non a ", "\nan ",
                   "e background, "):
        assert needle in text, needle
    assert any("," not in c for c in caps)
    assert any(c.count(" ") == 4 and c.endswith("background") and "," in c
               and not c.startswith(("a ", "an ")) for c in caps)   # "red circle, white background"
    assert all(parse_caption(c) == shapes.caption_attributes(shapes.draw_attributes(i))
               for i, c in enumerate(caps))
