"""The built-in demo model behind `bitdance-rt generate` with no options, and `bitdance-rt score`."""

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from bitdance_rt.cli import rt_app
from bitdance_rt.demo import WEIGHTS_DIR, shapes


def run(*args):
    return CliRunner().invoke(rt_app, list(args))


def save(path, image, prompt=None):
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", prompt)
    Image.fromarray(image).save(path, pnginfo=info)
    return str(path)


def test_generate_with_no_options_runs_the_demo_model_at_its_defaults(tmp_path):
    meta = json.loads((WEIGHTS_DIR / "bitdance_rt.json").read_text())
    d = meta["defaults"]
    prompt = "a blue square at the top, on a yellow background"
    r = run("generate", "--prompt", prompt, "--out", str(tmp_path / "a.png"), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "built-in demo model" in r.output and "a vocabulary of" in r.output
    assert "triangle" not in r.output.splitlines()[0]  # the words only for words it lacks
    assert "warning" not in r.output
    img = Image.open(tmp_path / "a.png")
    assert img.size == (d["width"], d["height"])
    assert img.text["steps"] == str(d["steps"]) and float(img.text["guidance"]) == d["guidance"]
    assert img.text["model"] == meta["name"]
    # the scorer reads the prompt the PNG records
    r = run("score", str(tmp_path / "a.png"))
    assert r.exit_code == 0, r.output
    assert prompt in r.output and "overall" in r.output


def test_words_outside_the_vocabulary_are_named_not_refused(tmp_path):
    r = run("generate", "--prompt", "a cat on a Mat", "--out", str(tmp_path / "a.png"),
            "--steps", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "never saw 'cat', 'mat'" in r.output
    assert (tmp_path / "a.png").is_file()


def test_missing_demo_weights_is_one_line(tmp_path, monkeypatch):
    import bitdance_rt.demo

    monkeypatch.setattr(bitdance_rt.demo, "WEIGHTS_DIR", tmp_path / "gone")
    r = run("generate", "--prompt", "a red circle, on a white background", "--out",
            str(tmp_path / "a.png"))
    assert r.exit_code == 2 and "built-in demo model is missing" in r.output
    assert "--checkpoint" in r.output


@pytest.mark.parametrize("seed", [0, 1])
def test_score_dataset_images_and_wrong_captions(tmp_path, seed):
    from bitdance_rt.demo import detect

    rng = np.random.default_rng(seed)
    idx = [int(i) for i in rng.integers(0, 10**6, size=6)]
    why = f"seed {seed}: dataset images {idx}"
    samples = [shapes.sample(i, 128) for i in idx]
    paths = [save(tmp_path / f"{k}.png", img, cap) for k, (img, cap, _) in enumerate(samples)]
    r = run("score", *paths, "--json", str(tmp_path / "s.json"))
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["summary"]["overall"] >= 0.95 and len(res["images"]) == 6, why
    assert [row["prompt"] for row in res["images"]] == [c for _, c, _ in samples]
    # the command reports what the library computes from the PNGs' pixels and prompts
    lib = detect.score([img for img, _, _ in samples], [c for _, c, _ in samples])
    assert res["summary"]["overall"] == lib["overall"], why
    assert [row["attributes"] for row in res["images"]] == json.loads(
        json.dumps(lib["details"])), why
    # one caption for all: the background is right exactly where it is that image's
    bg = samples[0][2]["background"]
    caption = f"a {samples[0][2]['objects'][0]['colour']} circle, on a {bg} background"
    r = run("score", *paths, "--prompt", caption, "--json", str(tmp_path / "w.json"))
    assert r.exit_code == 0, r.output
    wrong = json.loads((tmp_path / "w.json").read_text())
    assert [row["prompt"] for row in wrong["images"]] == [caption] * 6
    background_ok = [next(a["ok"] for a in row["attributes"] if a["kind"] == "background")
                     for row in wrong["images"]]
    assert background_ok == [s[2]["background"] == bg for s in samples], why
    assert wrong["summary"]["overall"] < res["summary"]["overall"], why


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("not-an-image", "not a readable image"),
    ("no-prompt", "records no prompt"),
    ("bad-caption", "cannot read the caption"),
    ("json-in-a-file", "is a file, so --json"),
    ("json-is-a-directory", "is a directory; name a file"),
])
def test_score_errors_are_one_line(tmp_path, case, words):
    img, _, _ = shapes.sample(1, 64)
    args = {"missing": [str(tmp_path / "nope.png")],
            "not-an-image": [str(tmp_path / "x.png")],
            "no-prompt": [save(tmp_path / "p.png", img)],
            "bad-caption": [save(tmp_path / "p.png", img), "--prompt", "a dog on a sofa"],
            "json-in-a-file": [save(tmp_path / "q.png", img, "a red circle, on a blue background"),
                               "--json", str(tmp_path / "x.png" / "r.json")],
            "json-is-a-directory": [save(tmp_path / "q.png", img, "a red circle, on a blue "
                                         "background"), "--json", str(tmp_path)]}[case]
    (tmp_path / "x.png").write_bytes(b"not a png")
    r = run("score", *args)
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_score_goes_on_past_images_it_cannot_score(tmp_path):
    """A caption outside the grammar, a missing file and an image without a prompt do not stop
    the batch: each is named with its reason, the others are scored (also in the JSON), and
    the command ends with one error line (exit 2)."""
    img, caption, _ = shapes.sample(3, 64)
    good = save(tmp_path / "good.png", img, caption)
    args = [save(tmp_path / "dog.png", img, "a dog on a sofa"), good,
            str(tmp_path / "missing.png"), save(tmp_path / "bare.png", img)]
    r = run("score", *args, "--json", str(tmp_path / "s.json"))
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert [line for line in lines if line.startswith("error:")] == [
        "error: 3 of 4 images were not scored (named above); the results are the others'"]
    assert sum(": not scored: " in line for line in lines) == 3, r.output
    assert any(line.startswith(f"{good}: background") for line in lines), r.output
    rows = json.loads((tmp_path / "s.json").read_text())["images"]
    assert [row["image"] for row in rows if "error" not in row] == [good]
    assert len([row for row in rows if "error" in row]) == 3
