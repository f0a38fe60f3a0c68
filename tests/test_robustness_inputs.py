"""Malformed input never reaches Python's own errors, and numbers that cannot be right are
refused: every JSON file, request body, prompt, seed, image and weight file a user hands over
ends, when it is wrong, in one BitDanceError line naming the file and the fix (exit 2 on the
command line), never in "internal error". The cases are generated (random nesting depth, random
wrong types, random byte damage) from the seeds of a ``seed`` parameter, named in every
assertion message."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from bitdance_rt.checkpoint import (_llm_files, load_checkpoint, read_spec, weights_fingerprint)
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.cli.app import Commands
from bitdance_rt.errors import BitDanceError, CheckpointError, EngineError, RequestError
from bitdance_rt.files import MapOf, Nullable, Opt, json_depth, parse_json, read_json
from bitdance_rt.limits import MAX_SEED
from bitdance_rt.manifest import FORMAT, MANIFEST, check_files, read_manifest, sha256_file
from bitdance_rt.request import GenerationRequest, plan_for
from conftest import fake_export

SEEDS = [0, 1, 2]
CONFIGS = ("config.json", "vision_head_config.json", "ae_config.json", "bitdance_rt.json")


def one_line(e: BaseException, seed, *words):
    text = str(e)
    assert "\n" not in text, f"seed {seed}: {text!r}"
    for w in words:
        assert w in text, f"seed {seed}: {w!r} not in {text!r}"
    return text


# -- random damage ----------------------------------------------------------------------------


def wrong_value(rng: random.Random, depth_max: int = 200):
    """A value of a random kind, often not the one a field needs."""
    kind = rng.randrange(12)
    if kind == 0:
        depth = rng.randint(2, depth_max)
        return json.loads("[" * depth + "]" * depth)
    if kind == 1:
        depth = rng.randint(2, 40)
        v = 1
        for _ in range(depth):
            v = {"k": v}
        return v
    return [None, True, False, "", "abc", -1, 0, 2**70, -2**70, 1.5e308, [1, 2],
            {"a": 1}][kind - 2]


def mutate_doc(rng: random.Random, doc):
    """``doc`` with one random value (at a random place) replaced, one key dropped, or the
    whole document replaced."""
    doc = json.loads(json.dumps(doc))
    how = rng.randrange(4)
    if how == 0 or not isinstance(doc, dict) or not doc:
        return wrong_value(rng)
    # walk down a random path of objects
    node = doc
    while True:
        key = rng.choice(sorted(node))
        if isinstance(node[key], dict) and node[key] and rng.random() < 0.6:
            node = node[key]
            continue
        if isinstance(node[key], list) and node[key] and rng.random() < 0.5:
            i = rng.randrange(len(node[key]))
            node[key][i] = wrong_value(rng)
        elif how == 1:
            del node[key]
        else:
            node[key] = wrong_value(rng)
        return doc


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    """Random byte damage: flipped bits, truncation, bytes that are not UTF-8, inserted
    brackets."""
    data = bytearray(data)
    how = rng.randrange(5)
    if how == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:
        data = data[:rng.randrange(len(data) + 1)]
    elif how == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes([rng.choice([0xFF, 0xC3, 0x80, 0xED, 0xA0])])
    elif how == 3:
        at = rng.randrange(len(data) + 1)
        data[at:at] = b"[" * rng.randint(1, 5000)
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(data)


def write_case(rng, path: Path):
    """Damage ``path`` (a JSON file) in place: a typed mutation or byte damage."""
    if rng.random() < 0.6:
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(mutate_doc(rng, doc)))
    else:
        path.write_bytes(damage_bytes(rng, path.read_bytes()))


@pytest.fixture(scope="module")
def configs_only(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's configs and tokenizer, no weights (read_spec needs no more)."""
    d = tmp_path_factory.mktemp("configs")
    for p in tiny_ckpt.iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, d / p.name)
    return d


# -- the one reader ----------------------------------------------------------------------------


SCHEMA = {"a": int, "b": Opt([float]), "c": Opt(MapOf({"x": Nullable(str)})), "d": Opt(bool)}


@pytest.mark.parametrize("seed", SEEDS)
def test_read_json_turns_every_damage_into_one_line(seed, tmp_path):
    rng = random.Random(seed)
    good = {"a": 1, "b": [1.5, 2], "c": {"k": {"x": None}, "l": {"x": "y"}}, "d": True}
    path = tmp_path / "f.json"
    refused = 0
    for case in range(150):
        path.write_text(json.dumps(good))
        write_case(rng, path)
        try:
            doc = read_json(path, "test file", fix="fix it", schema=SCHEMA)
        except BitDanceError as e:
            refused += 1
            one_line(e, (seed, case), "test file", str(path), "fix it")
            continue
        assert isinstance(doc, dict) and isinstance(doc["a"], int), f"seed {seed} case {case}"
        assert not isinstance(doc["a"], bool), f"seed {seed} case {case}: {doc}"
        for v in doc.get("b", []):
            assert isinstance(v, (int, float)) and math.isfinite(v), f"seed {seed}: {doc}"
    assert refused > 100, f"seed {seed}: only {refused} of 150 damaged files refused"


@pytest.mark.parametrize("seed", SEEDS)
def test_depth_size_and_encoding_limits(seed, tmp_path):
    rng = random.Random(seed)
    path = tmp_path / "deep.json"
    for _ in range(12):
        depth = rng.randint(33, 30_000)
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        path.write_text(opener * depth + "1" + closer * depth)
        with pytest.raises(BitDanceError, match="nested .* levels deep") as e:
            read_json(path, "deep file")
        one_line(e.value, seed)
        # brackets inside strings are text, not nesting
        text = json.dumps({"s": "[" * depth})
        assert json_depth(text) == 1, f"seed {seed}"
        assert parse_json(text, "x") == {"s": "[" * depth}
    path.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(BitDanceError, match="not UTF-8"):
        read_json(path)
    path.write_text('{"a": NaN}')
    with pytest.raises(BitDanceError, match="not valid JSON"):
        read_json(path)
    path.write_text('{"a": ' + "9" * 5000 + "}")
    with pytest.raises(BitDanceError, match="not valid JSON"):
        read_json(path)
    path.write_text(json.dumps({"a": "x" * 2000}))
    with pytest.raises(BitDanceError, match="bytes long"):
        read_json(path, max_bytes=1000)
    with pytest.raises(BitDanceError, match="is not a file"):
        read_json(tmp_path)


# -- checkpoints: the three configs, bitdance_rt.json, the shard index ---------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_configs_are_one_line_checkpoint_errors(seed, configs_only, tmp_path):
    rng = random.Random(seed)
    refused = 0
    for case in range(40):
        d = tmp_path / f"c{case}"
        shutil.copytree(configs_only, d)
        name = rng.choice(CONFIGS)
        if name == "bitdance_rt.json" and not (d / name).exists():
            (d / name).write_text(json.dumps({"sizes": [[256, 896]], "defaults": {
                "height": 256, "width": 896, "steps": 2, "guidance": 2.0}}))
        write_case(rng, d / name)
        try:
            spec = read_spec(d)
        except CheckpointError as e:
            refused += 1
            one_line(e, (seed, case))
            continue
        spec.validate()  # what was accepted is a valid model
        shutil.rmtree(d)
    assert refused >= 25, f"seed {seed}: only {refused} of 40 damaged configs refused"


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_shard_index_is_refused(seed, configs_only, tmp_path):
    rng = random.Random(seed)
    index = {"metadata": {"total_size": 1}, "weight_map": {"model.embed_tokens.weight":
                                                           "model-00001-of-00002.safetensors"}}
    for case in range(30):
        d = tmp_path / f"i{case}"
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
        path = d / "model.safetensors.index.json"
        path.write_text(json.dumps(index))
        write_case(rng, path)
        try:
            files = _llm_files(d)
        except CheckpointError as e:
            one_line(e, (seed, case))
            continue
        assert all(p.parent == d for p in files.values()), f"seed {seed} case {case}: {files}"


def test_the_cli_says_one_line_for_damaged_configs(configs_only, tmp_path):
    """Through `generate`: exit 2 and one line, before any weight is read (the configs-only
    directory has none)."""
    seed = 7
    rng = random.Random(seed)
    for case in range(8):
        d = tmp_path / f"c{case}"
        shutil.copytree(configs_only, d)
        if case < 4:  # the cases that used to be internal errors
            (d / CONFIGS[case]).write_text(["[" * 100_000 + "]" * 100_000, "[1, 2]",
                                            '{"ddconfig": [1]}', "[1]"][case])
        else:
            write_case(rng, d / rng.choice(CONFIGS[:3]))
        r = CliRunner().invoke(rt_app, ["generate", "-c", str(d), "-p", "a boat", "--device",
                                        "cpu", "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 2, f"seed {seed} case {case}: {r.output}"
        assert "internal error" not in r.output and len(r.output.strip().splitlines()) == 1, \
            f"seed {seed} case {case}: {r.output}"


# -- manifests and engines.json ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_manifests_are_one_line_engine_errors(seed, tmp_path):
    rng = random.Random(seed)
    base = tmp_path / "base"
    good = fake_export(base)
    assert read_manifest(base) == good
    check_files(good, base)
    refused = 0
    for case in range(60):
        d = tmp_path / f"m{case}"
        shutil.copytree(base, d)
        write_case(rng, d / MANIFEST)
        try:
            m = read_manifest(d)
            check_files(m, d)
        except EngineError as e:
            refused += 1
            one_line(e, (seed, case))
        shutil.rmtree(d)
    assert refused >= 40, f"seed {seed}: only {refused} of 60 damaged manifests refused"


def test_older_manifest_formats_get_the_reexport_message(tmp_path):
    fake_export(tmp_path / "e")
    m = json.loads((tmp_path / "e" / MANIFEST).read_text())
    for fmt in (1, 2, 3, "4", None):
        (tmp_path / "e" / MANIFEST).write_text(json.dumps({**m, "format": fmt}))
        with pytest.raises(EngineError, match="re-run the export with this version"):
            read_manifest(tmp_path / "e")


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_engines_json_is_one_line(seed, tmp_path):
    from bitdance_rt.manifest import ENGINES, GRAPHS, check_engines, read_engines

    rng = random.Random(seed)
    d = tmp_path / "engines"
    d.mkdir()
    (d / MANIFEST).write_text("{}")
    engines = {}
    for name in GRAPHS:
        (d / f"{name}.engine").write_bytes(name.encode())
        engines[name] = {"file": f"{name}.engine", "bytes": len(name),
                         "sha256": sha256_file(d / f"{name}.engine"), "profile": {}}
    info = {"format": 1, "flavor": "tensorrt_rtx", "version": "1.0", "targets": ["sm89"],
            "export": {"dir": str(tmp_path / "gone"), "manifest_sha256": sha256_file(d / MANIFEST),
                       "onnx_sha256": {}}, "engines": engines}
    (d / ENGINES).write_text(json.dumps(info))
    check_engines(read_engines(d), d)
    for case in range(60):
        (d / ENGINES).write_text(json.dumps(info))
        write_case(rng, d / ENGINES)
        try:
            check_engines(read_engines(d), d)
        except EngineError as e:
            one_line(e, (seed, case))


def test_a_damaged_hash_record_is_only_rehashed(tmp_path):
    from bitdance_rt.manifest import VERIFIED

    base = tmp_path / "e"
    m = fake_export(base)
    for junk in ("[" * 100_000, "\xff", "[1]", '{"prefill.onnx": 5}'):
        (base / VERIFIED).write_text(junk, errors="surrogateescape")
        check_files(m, base)
        assert json.loads((base / VERIFIED).read_text())["prefill.onnx"][-1] == \
            m["graphs"]["prefill"]["sha256"]["prefill.onnx"]


# -- the server's request body ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_configs(tiny_ckpt):
    return load_checkpoint(tiny_ckpt, weights=False)


class _Session:
    def __init__(self, model):
        self.model, self.spec = model, model.spec

    def plan(self, *requests):
        return plan_for(self.model, *requests)


@pytest.mark.parametrize("seed", SEEDS)
def test_request_bodies_get_4xx_never_a_python_error(seed, tiny_configs):
    from bitdance_rt.serve.api import ApiError, parse_body, to_request

    rng = random.Random(seed)
    good = {"prompt": "a red boat", "n": 1, "size": "896x256", "steps": 1, "guidance": 2.0,
            "seed": 3}
    session = _Session(tiny_configs)
    answered = 0
    for case in range(120):
        if rng.random() < 0.5:
            body = json.dumps(mutate_doc(rng, good)).encode()
        else:
            body = damage_bytes(rng, json.dumps(good).encode())
        if rng.random() < 0.2:  # a prompt with a lone surrogate, as JSON escapes carry it
            body = json.dumps({**good, "prompt": "a \\ud800 boat"}).encode().replace(
                b"\\\\", b"\\")
        try:
            plan = to_request(parse_body(body), session, "tiny")
        except ApiError as e:
            assert 400 <= e.status < 500, f"seed {seed} case {case}: {e.status} {e.message}"
            assert "\n" not in e.message, f"seed {seed} case {case}: {e.message!r}"
            continue
        answered += 1
        assert plan.images >= 1, f"seed {seed} case {case}"
    assert answered < 120, f"seed {seed}"


# -- prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_prompts_the_tokenizer_cannot_take_are_request_errors(seed, tiny_configs):
    rng = random.Random(seed)
    for case in range(80):
        chars = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.randrange(5)
            if kind == 0:
                chars.append(chr(rng.randint(0xD800, 0xDFFF)))  # lone surrogates
            elif kind == 1:
                chars.append(chr(rng.randint(0, 0x1F)))          # control characters
            elif kind == 2:
                chars.append(chr(rng.randint(0xE000, 0x10FFFF)))
            else:
                chars.append(rng.choice("abc xyz"))
        prompt = "".join(chars)
        try:
            plan = plan_for(tiny_configs, GenerationRequest(prompt, 256, 896, steps=1))
        except RequestError as e:
            text = one_line(e, (seed, case))
            surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
            assert surrogate or not prompt.strip(), f"seed {seed}: {prompt!r}: {text}"
            continue
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in prompt), f"seed {seed}: {prompt!r}"
        assert plan.cond_ids[0], f"seed {seed}"


def test_bytes_that_are_not_utf8_on_the_command_line(tiny_ckpt, tmp_path):
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(tiny_ckpt), "-p", "a \udcff boat",
                                    "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "U+DCFF" in r.output and "not UTF-8" in r.output, r.output


# -- seeds, steps and the memory planner ---------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_make_tiny_seeds_beyond_the_range_are_refused_first(seed, tmp_path):
    from bitdance_rt.tiny import make_tiny

    rng = random.Random(seed)
    (tmp_path / "file").write_text("x")  # an output make-tiny refuses after the settings
    for case in range(30):
        value = rng.choice([rng.randint(-2**80, -1), rng.randint(MAX_SEED + 1, 2**80),
                            rng.randint(0, MAX_SEED), 2**64, MAX_SEED, 0])
        with pytest.raises(BitDanceError) as e:
            make_tiny(tmp_path / "file", seed=value)
        bad = not 0 <= value <= MAX_SEED
        assert ("--seed" in str(e.value)) == bad, f"seed {seed}: {value}: {e.value}"
    r = CliRunner().invoke(export_app, ["make-tiny", str(tmp_path / "n"), "--seed", str(2**64)])
    assert r.exit_code == 2 and "--seed" in r.output and (
        "must be an integer from 0 to" in r.output or "too large" in r.output), r.output
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("seed", SEEDS)
def test_memory_checks_settings_exactly_as_generate_does(seed):
    """`bitdance-rt memory` and `generate` run one validator: the same settings get the same
    message, or both pass."""
    from bitdance_rt.memory import memory_budget
    from bitdance_rt.spec import preset

    rng = random.Random(seed)
    spec = preset("tiny")
    for case in range(40):
        settings = dict(
            height=rng.choice([None, 256, 512, 100, -16, 0, 2**40]),
            width=rng.choice([None, 896, 512, 7, -896]),
            steps=rng.choice([None, 1, 25, 0, -1, -2**70, 1000, 1001, 2**64]),
            guidance=rng.choice([None, 1.0, 7.5, 0.5, -3.0, float("nan"), float("inf"), 101.0]),
            num_images=rng.choice([1, 2, 0, -1, 65, 2**64]))
        req = GenerationRequest("x", settings["height"], settings["width"], settings["steps"],
                                settings["guidance"], num_images=settings["num_images"])
        try:
            req.validate(spec)
            want = None
        except BitDanceError as e:
            want = (type(e), str(e))
        if want is None:
            continue  # computing a valid budget is another test's business
        with pytest.raises(BitDanceError) as e:
            memory_budget(spec, None, settings["height"], settings["width"],
                          settings["num_images"], settings["steps"], settings["guidance"])
        assert (type(e.value), str(e.value)) == want, f"seed {seed} case {case}: {settings}"


def test_memory_cli_refuses_bad_settings_in_one_line():
    for args, words in ((["--steps", "-1"], "steps must be between 1 and"),
                        (["--num-images", "0"], "number of images"),
                        (["--guidance", "nan"], "guidance must be"),
                        (["--prompt-tokens", str(10**11)], "--prompt-tokens"),
                        (["--prompt-tokens", "8000", "--height", "256", "--width", "896"],
                         "positions")):
        r = CliRunner().invoke(rt_app, ["memory", "--preset", "tiny", *args])
        assert r.exit_code == 2 and words in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, (args, r.output)


def test_check_refuses_seeds_beyond_the_range(tmp_path):
    from bitdance_rt.export.check import check_export

    for value in (-1, MAX_SEED + 1, 2**64):
        with pytest.raises(BitDanceError, match="--seed must be an integer"):
            check_export(tmp_path, seed=value)


# -- images for `score` -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_images_are_unreadable_not_internal_errors(seed, tmp_path):
    import numpy as np
    from PIL import Image

    from bitdance_rt.cli.score import read_image

    rng = random.Random(seed)
    src = tmp_path / "ok.png"
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(src)
    data = src.read_bytes()
    for case in range(60):
        path = tmp_path / f"d{case}.png"
        path.write_bytes(damage_bytes(rng, data))
        try:
            img, _ = read_image(path)
        except BitDanceError as e:
            one_line(e, (seed, case), str(path))
            continue
        assert img.ndim == 3 and img.shape[2] == 3, f"seed {seed} case {case}"


def test_an_image_too_large_for_pil_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("1", (400, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 120000 > 2x: a decompression bomb
    r = CliRunner().invoke(rt_app, ["score", str(tmp_path / "big.png"), "-p",
                                    "a red circle on the left, on a white background"])
    assert r.exit_code == 2 and "too large" in r.output, r.output
    assert "internal error" not in r.output


# -- weight files -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_damaged_safetensors_are_checkpoint_errors(seed, tiny_ckpt, tmp_path):
    rng = random.Random(seed)
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    refused = 0
    for case in range(12):
        name = rng.choice(["projector.safetensors", "vision_head.safetensors"])
        good = (tiny_ckpt / name).read_bytes()
        data = bytearray(good)
        how = rng.randrange(4)
        if how == 0:
            data = data[:rng.randrange(len(data))]
        elif how == 1:  # the header (its length or its JSON)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 2000))] ^= 1 << rng.randrange(8)
        elif how == 2:
            data[:8] = rng.randbytes(8)
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
        (d / name).write_bytes(bytes(data))
        for step in (lambda: weights_fingerprint(d), lambda: load_checkpoint(d)):
            try:
                step()
            except CheckpointError as e:
                refused += 1
                one_line(e, (seed, case))
        (d / name).write_bytes(good)
    assert refused >= 8, f"seed {seed}: only {refused} refusals"


# -- numbers that cannot be right ---------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_weights_are_refused_naming_the_tensor(seed, tiny_ckpt, tmp_path,
                                                          monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = random.Random(seed)
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    name = rng.choice(["model.safetensors", "vision_head.safetensors", "ae.safetensors",
                       "projector.safetensors"])
    tensors = load_file(d / name)
    keys = sorted(k for k, t in tensors.items() if t.is_floating_point()
                  and not k.startswith(("lm_head.", "encoder.")))
    key = rng.choice(keys)
    flat = tensors[key].view(-1)
    flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    save_file(tensors, d / name)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    one_line(e.value, seed, name, repr(key), "NaN or infinite")
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(d), "-p", "x", "--height", "256",
                                    "--width", "896", "--steps", "1", "--device", "cpu",
                                    "--no-progress", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and key in r.output, f"seed {seed}: {r.output}"
    assert not (tmp_path / "x.png").exists()


def test_the_finite_verdict_is_remembered_until_a_file_changes(tiny_ckpt, tmp_path,
                                                               monkeypatch):
    import bitdance_rt.checkpoint as ck

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    calls = []
    real = ck.nonfinite_count
    monkeypatch.setattr(ck, "nonfinite_count", lambda t: calls.append(1) or real(t))
    load_checkpoint(d)
    first = len(calls)
    assert first > 20
    load_checkpoint(d)
    assert len(calls) == first  # every tensor's verdict was remembered
    before = set(p.name for p in d.iterdir())
    assert before == set(p.name for p in tiny_ckpt.iterdir())  # nothing written into it
    (d / "projector.safetensors").write_bytes((d / "projector.safetensors").read_bytes())
    load_checkpoint(d)
    assert first < len(calls) < 2 * first  # the rewritten file only


def calibration(model, value=1.0):
    """A synthetic calibration of ``model``'s quantizable layers (every statistic ``value``)."""
    from bitdance_rt.calibration.recipes import HEAD, LLM, quantized_names
    from bitdance_rt.calibration.stats import FORMAT as CAL_FORMAT, Calibration

    meta = {"format": CAL_FORMAT, "weights_fingerprint": weights_fingerprint(model.path),
            "config_hash": model.spec.config_hash(), "prompts_sha256": "0" * 16,
            "samples": 1, "steps": 1, "height": 256, "width": 896, "guidance": 2.0, "seed": 0}
    calib = Calibration(meta)
    for comp, module in ((LLM, model.llm), (HEAD, model.head)):
        for name in quantized_names(comp, module):
            k = module.get_submodule(name).in_features
            calib.amax[f"{comp}/{name}"] = value
            calib.channel_max[f"{comp}/{name}"] = torch.full((k,), value)
    return calib


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_statistics_are_refused(seed, tiny_model, tmp_path):
    from bitdance_rt.calibration.quantize import quantize_checkpoint
    from bitdance_rt.calibration.stats import Calibration

    rng = random.Random(seed)
    calib = calibration(tiny_model)
    key = rng.choice(sorted(calib.amax))
    bad = rng.choice([float("nan"), float("inf")])
    if rng.random() < 0.5:
        calib.amax[key] = bad
    else:
        calib.channel_max[key][rng.randrange(calib.channel_max[key].numel())] = bad
    with pytest.raises(BitDanceError, match="not finite") as e:
        calib.save(tmp_path / "c.safetensors")
    one_line(e.value, seed, key)
    assert not (tmp_path / "c.safetensors").exists()
    # a file that holds such statistics (written around the check) is refused when read
    from safetensors.torch import save_file

    from bitdance_rt.calibration.stats import META_KEY, SHA_KEY, content_sha256

    tensors = {}
    for k, v in calib.amax.items():
        tensors[f"{k}.amax"] = torch.tensor(v)
        tensors[f"{k}.channel_max"] = calib.channel_max[k]
    sha = content_sha256(calib.meta, {k: float(torch.tensor(v)) for k, v in calib.amax.items()},
                         calib.channel_max)
    save_file(tensors, str(tmp_path / "c.safetensors"),
              metadata={META_KEY: json.dumps(calib.meta), SHA_KEY: sha})
    with pytest.raises(BitDanceError, match="not finite"):
        Calibration.load(tmp_path / "c.safetensors")
    with pytest.raises(BitDanceError, match="not finite"):
        quantize_checkpoint(tiny_model.path, "int8-sq", tmp_path / "q", tmp_path / "c.safetensors")
    assert not (tmp_path / "q").exists()


def test_max_seq_below_the_largest_size_is_refused_before_the_export(tiny_ckpt, tmp_path,
                                                                      monkeypatch):
    """The least --max-seq is the largest declared size's tokens and a one-character prompt:
    one less is refused before the weights load, naming the minimum."""
    from bitdance_rt.export import exporter

    spec = tiny_configs_of(tiny_ckpt)
    h, w = max(spec.spec.info.sizes, key=lambda s: s[0] * s[1])
    need = plan_for(spec, GenerationRequest("x", h, w, guidance=2.0)).max_len(
        spec.spec.parallel_num)
    monkeypatch.setattr(exporter, "load_checkpoint", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("weights loaded before the settings were checked")))
    rng = random.Random(5)
    for value in [need - 1, 1, rng.randint(2, need - 1)]:
        r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out",
                                            str(tmp_path / "e"), "--max-seq", str(value)])
        assert r.exit_code == 2, f"seed 5: --max-seq {value}: {r.output}"
        assert f"--max-seq {need} or more" in r.output and f"{h}x{w}" in r.output, r.output
        assert not (tmp_path / "e").exists()
    exporter.check_settings("standard", 1, need, spec.spec, spec.tokenizer)  # the minimum passes


def tiny_configs_of(ckpt):
    return load_checkpoint(ckpt, weights=False)


# -- the CLI's policy: the user's problems in one line, bugs as bugs ------------------------------


def test_cli_policy_separates_the_users_problems_from_bugs():
    app = typer.Typer(cls=Commands, add_completion=False)

    @app.command()
    def boom(kind: str):
        if kind == "oserror":
            raise PermissionError(13, "Permission denied", "/some/file")
        if kind == "memory":
            raise MemoryError()
        if kind == "oserror-without-errno":  # raised by code, not by the system: a bug
            raise OSError("something odd")
        if kind == "user":
            raise BitDanceError("a message\nwith a newline from a user's file")
        raise KeyError("a bug")

    @app.command()
    def other():
        pass

    for kind, code, words in (("oserror", 2, "Permission denied (/some/file)"),
                              ("memory", 2, "out of memory"),
                              ("oserror-without-errno", 1, "internal error: OSError"),
                              ("user", 2, "a message with a newline"),
                              ("bug", 1, "internal error: KeyError")):
        r = CliRunner().invoke(app, ["boom", kind])
        assert r.exit_code == code and words in r.output, (kind, r.output)
        assert len(r.output.strip().splitlines()) == 1, (kind, r.output)


def _every_command():
    """(app, argv prefix, command) for every command of both console scripts."""
    for app in (rt_app, export_app):
        group = typer.main.get_command(app)
        yield app, [], group  # the group's own options (bitdance-export's export)
        for sub, cmd in group.commands.items():
            yield app, [sub], cmd


def _kind(param):
    """The Python type of a parameter's values (Optional[...] unwrapped)."""
    import typing

    ann = param.type_descriptor.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if args else ann


def _filler(param) -> str:
    """A value of the right type for a required parameter (the rules checked here run once
    the command line is parsed, before the command)."""
    return "1" if _kind(param) in (int, float) else "x"


@pytest.mark.parametrize("seed", [0, 1])
def test_no_option_takes_an_empty_value_or_a_number_past_64_bits(seed):
    """Every option of every command: an empty or white-space value, and for every integer
    option a number of 2^63 and beyond (either sign), is one line naming the option, exit 2,
    before any work."""
    rng = random.Random(seed)
    cases = 0
    for app, prefix, cmd in _every_command():
        required = []
        for p in cmd.params:
            if p.required:
                required += ([p.opts[0]] if p.param_type_name == "option" else []) + [_filler(p)]
        for p in cmd.params:
            if p.param_type_name != "option" or p.is_flag or p.name in ("debug", "help"):
                continue
            opt = next((o for o in p.opts if o.startswith("--")), p.opts[0])
            bad = [rng.choice(["", " ", "\t", "  \n"])]
            if _kind(p) is int:
                bad.append(str(rng.choice([1, -1]) * (2**63 + rng.randrange(2**70))))
            for value in bad:
                given = list(required)
                if p.opts[0] in given:  # the option itself is required: drop its filler
                    i = given.index(p.opts[0])
                    given = given[:i] + given[i + 2:]
                args = prefix + given + [opt, value]
                r = CliRunner().invoke(app, args)
                case = f"seed {seed}: {' '.join(map(repr, args))}"
                out = r.output.strip()
                assert r.exit_code == 2 and "Traceback" not in out, (case, out)
                # ours ("error: ...") or, for a value that is not a number at all, the
                # parser's usage error; either names the option
                err = [line for line in out.splitlines() if line.lower().startswith("error:")]
                assert len(err) == 1 and any(o in err[0] for o in p.opts), (case, out)
                cases += 1
    assert cases > 100, cases
