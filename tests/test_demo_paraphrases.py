"""The hand-written paraphrase prompts of the demo model (bitdance_rt/demo/paraphrases.tsv) and
bench/adherence.py's prompt sets: the file is well formed, each paraphrase says what its
canonical caption says in words the training template never used, the set is balanced, and
the bench generates from the paraphrase and scores against the canonical caption. No image
generation: a few seconds."""

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bitdance_rt.demo import detect, shapes

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "bitdance_rt" / "demo" / "paraphrases.tsv"

# Every word of the paraphrases (lower case, runs of letters). A new word is a conscious change:
# add it here, and keep to words a user would plausibly type.
VOCABULARY = {
    "a", "above", "against", "an", "and", "at", "backdrop", "background", "below", "black",
    "blue", "bottom", "center", "centered", "centre", "circle", "colored", "coloured", "draw",
    "green", "half", "hand", "image", "in", "is", "its", "left", "located", "lower", "middle",
    "near", "next", "of", "on", "one", "orange", "over", "picture", "placed", "plain", "purple",
    "red", "right", "shapes", "side", "simple", "single", "sitting", "solid", "square", "that",
    "the", "to", "top", "triangle", "two", "underneath", "up", "upper", "white", "with",
    "yellow",
}


def _rows():
    lines = TSV.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and "paraphrase" in lines[0].lower(), "header comment first"
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if line.startswith("#"):
            continue
        assert line.count("\t") == 1, f"line {lineno}: one tab between the two captions"
        para, canon = line.split("\t")
        assert para.strip() == para and para, f"line {lineno}: paraphrase {para!r}"
        assert canon.strip() == canon and canon, f"line {lineno}: canonical {canon!r}"
        rows.append((para, canon))
    return rows


ROWS = _rows()


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_adherence_para",
                                                  ROOT / "bench" / "adherence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_adherence_para"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_file_parses():
    assert len(ROWS) >= 72
    assert len({p for p, _ in ROWS}) == len(ROWS), "a paraphrase appears twice"


def test_canonical_captions_are_the_template():
    bad = []
    for para, canon in ROWS:
        attrs = detect.parse_caption(canon)
        colours = [o["colour"] for o in attrs["objects"]]
        # exactly the template (articles, comma), as the dataset writes it, and a caption the
        # dataset could draw: different colours, a left/right or top/bottom pair
        if (shapes.caption_of(attrs) != canon or len(set(colours)) != len(colours)
                or attrs["background"] in colours
                or (len(colours) == 2 and {o["position"] for o in attrs["objects"]}
                    not in ({"left", "right"}, {"top", "bottom"}))):
            bad.append(canon)
    assert not bad


def test_paraphrases_are_no_training_wording():
    """Held out for real: no paraphrase is the template or a wording the training caption
    generator can produce (every wording of the caption's attributes enumerated; case and
    punctuation aside), and the scorer's caption reader does not read it either."""
    bad = []
    for para, canon in ROWS:
        try:
            detect.parse_caption(para)
            bad.append(para)
        except ValueError:
            pass
        if para == canon or shapes.normalize(para) in shapes.wordings(detect.parse_caption(canon)):
            bad.append(para)
    assert not bad, "these are training wordings"


def test_paraphrases_name_what_their_captions_name():
    """The same colour and shape words as the canonical caption (a paraphrase that swapped a
    colour or dropped a shape would be scored against the wrong attributes)."""
    bad = []
    for para, canon in ROWS:
        for vocab in (shapes.COLOURS, shapes.SHAPES):
            if ({w for w in _words(para) if w in vocab}
                    != {w for w in _words(canon) if w in vocab}):
                bad.append((para, canon))
        if (sum(w in shapes.SHAPES for w in _words(para))
                != len(detect.parse_caption(canon)["objects"])):
            bad.append((para, canon))
    assert not bad


def test_balance():
    obj_colour, background, shape = Counter(), Counter(), Counter()
    two = 0
    for _, canon in ROWS:
        attrs = detect.parse_caption(canon)
        background[attrs["background"]] += 1
        two += len(attrs["objects"]) == 2
        for o in attrs["objects"]:
            obj_colour[o["colour"]] += 1
            shape[o["shape"]] += 1
    for c in shapes.COLOURS:
        assert obj_colour[c] >= 4, ("object colour", c, obj_colour)
        assert background[c] >= 4, ("background", c, background)
    for s in shapes.SHAPES:
        assert shape[s] >= 10, (s, shape)
    assert two >= 15
    assert 0.55 <= 1 - two / len(ROWS) <= 0.8, "about two thirds one-object captions"


def test_vocabulary_is_the_listed_one():
    words = {w for p, _ in ROWS for w in _words(p)}
    assert words - VOCABULARY == set(), "new words: add them to VOCABULARY on purpose"
    assert VOCABULARY - words == set(), "words no longer used: remove them from VOCABULARY"
    # the paraphrases use words the template never did
    assert len(words - set(shapes.vocabulary())) >= 20


def test_bench_prompt_sets():
    A = _load_bench()
    assert A.PARAPHRASES.resolve() == TSV.resolve()
    assert A.read_paraphrases() == ROWS
    prompts, targets, canonical = A.prompt_set("paraphrase", 1000)
    assert prompts == [p for p, _ in ROWS] and canonical == [c for _, c in ROWS]
    assert targets == [detect.parse_caption(c) for _, c in ROWS]
    assert len(A.prompt_set("paraphrase", 5)[0]) == 5
    prompts, targets, canonical = A.prompt_set("template", 7)
    assert prompts == targets == canonical == [c for _, c, _ in shapes.heldout(7)]


class _FakeSession:
    """Records (prompt, seed, guidance); draws a plain white image."""

    def __init__(self):
        self.calls = []

    def generate(self, *reqs):
        out = []
        for r in reqs:
            self.calls.append((r.prompt, r.seed, r.guidance))
            out.append([torch.full((128, 128, 3), 245, dtype=torch.uint8)])
        return out


def test_bench_run_generates_the_paraphrase_and_scores_the_canonical():
    A = _load_bench()
    session = _FakeSession()
    logs = []
    res = A.run(session, 3, [4.0, 1.0], 25, seed=10, sets=A.SETS, log=logs.append)
    assert list(res) == ["template 4", "paraphrase 4", "template 1", "paraphrase 1"]
    para = [p for p, _ in ROWS[:3]]
    template = [c for _, c, _ in shapes.heldout(3)]
    assert session.calls[:6] == ([(c, 10 + k, 4.0) for k, c in enumerate(template)]
                                 + [(p, 10 + k, 4.0) for k, p in enumerate(para)])
    r = res["paraphrase 4"]
    assert r["set"] == "paraphrase" and r["guidance"] == 4.0 and r["prompts"] == para
    assert r["canonical"] == [c for _, c in ROWS[:3]]
    white = detect.score([np.full((128, 128, 3), 245, np.uint8)] * 3,
                         [c for _, c in ROWS[:3]])
    assert r["overall"] == white["overall"] and r["details"] == white["details"]
    assert any(m.startswith("paraphrase, guidance 4: ") for m in logs)
    assert any("images" in m and "left" in m for m in logs), "progress lines"
    text = A.table(res, 25, "torch")
    assert "| 4 | paraphrase - template |" in text and "| 1 | template | 3 |" in text
    # one set: the keys and table of the runs before there were sets
    one = A.run(_FakeSession(), 2, [4.0], 25, seed=0, log=logs.append)
    assert list(one) == ["4"] and one["4"]["set"] == "template"
    assert A.table(one, 25, "torch").startswith("2 held-out prompts, 25 steps")


def _result(overall, guidance=None, set_name=None):
    r = {"overall": overall, "by_kind": {k: overall for k in detect.KINDS},
         "counts": {k: 1 for k in detect.KINDS}, "all_right": 0.5, "images": 2,
         "seconds_per_image": 1.0}
    if guidance is not None:
        r["guidance"] = guidance
    if set_name is not None:
        r["set"] = set_name
    return r


def test_summarize_old_and_new_files(tmp_path):
    A = _load_bench()
    old = tmp_path / "old.json"  # as written before there were prompt sets
    old.write_text(json.dumps({"label": "reference", "split": "heldout", "backend": "reference",
                               "results": {"4": _result(0.899, 4.0), "1": _result(0.834, 1.0)},
                               "autoencoder": _result(0.94)}))
    text = A.summarize([old])
    assert text.splitlines()[0].startswith("| run | backend | guidance |")
    assert "| reference | reference | 4 | 0.899 |" in text
    assert "| reference | reference | 1 | 0.834 |" in text
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"label": None, "set": "both", "backend": "torch",
                               "results": {"template 4": _result(0.9, 4.0, "template"),
                                           "paraphrase 4": _result(0.7, 4.0, "paraphrase")},
                               "autoencoder": None}))
    text = A.summarize([old, new])
    lines = text.splitlines()
    assert lines[0].startswith("| run | backend | set | guidance |")
    assert len({line.count("|") for line in lines}) == 1, text
    assert "| reference | reference | template | 4 | 0.899 |" in text
    assert "| new | torch | paraphrase | 4 | 0.700 |" in text
