"""The class-conditional ImageNet family: seed-exact sampling against goldens made by the
authors' code, converting their .pt files (safely, strictly), tiny checkpoints, the CLI.

The goldens (tests/data/imagenet_golden/) were made by running the authors' ``model.sample``
on make-tiny checkpoints with ``TORCH_COMPILE_DISABLE=1`` (their ``@torch.compile`` off: the
contract is the eager computation) and their ``nn.Linear`` computing through our tiled Linear
(why: make_golden.py's docstring, which also says how to remake them). Here our sampler, both
backends, must reproduce every token and every pixel.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import BitDanceError, CheckpointError
from bitdance_rt.imagenet import checkpoint, pt_files, sample, tiny
from bitdance_rt.imagenet.classes import class_name, resolve_class, synsets
from bitdance_rt.imagenet.spec import PRESETS, ImageNetSpec, match_preset
from conftest import one_line_error

GOLDEN = Path(__file__).parent / "data" / "imagenet_golden"


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as the goldens were made (tests/data/imagenet_golden/make_golden.py:
    the decoder's GroupNorm over channels_last activations sums per thread, so the decoded
    pixels depend on the thread count by one level in a few values; the tokens do not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def golden(p: int):
    z = np.load(GOLDEN / f"golden_p{p}.npz")
    return z, json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """make-tiny checkpoints (both forms) with the goldens' seeds, made once for the module."""
    made = {}

    def get(p: int) -> Path:
        if p not in made:
            _, meta = golden(p)
            made[p] = tiny.make_tiny(tmp_path_factory.mktemp(f"imagenet{p}") / "ckpt", p,
                                     meta["make_tiny_seed"])
        return made[p]
    return get


# -- seed-exact sampling -------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 4, 16])
def test_golden_weights_are_what_make_tiny_writes_today(p, tiny_dirs):
    """A changed make-tiny must fail here, not make the golden comparison compare other
    weights."""
    _, meta = golden(p)
    pt_dir = tiny_dirs(p) / tiny.PT_DIR
    model_name, ae_name = tiny.pt_names(p)
    ckpt = pt_files.read_pt(pt_dir / model_name, "model")
    ae = pt_files.read_pt(pt_dir / ae_name, "autoencoder")
    on_disk = tiny.digest(ckpt["model"], ckpt["ema"], ae["state_dict"])
    assert on_disk == tiny.digest(*tiny.tiny_states(p, meta["make_tiny_seed"]))
    assert on_disk == meta["weights_sha256"], (
        "make-tiny --family imagenet now writes other weights than the goldens were made "
        "from; remake them (tests/data/imagenet_golden/make_golden.py)")


def _platform_note(meta) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    here = make_golden.platform_fingerprint()
    differ = [k for k, v in meta["platform"].items() if here.get(k) != v]
    if not differ:
        return "this machine's float32 kernels round as the golden machine's did"
    return (f"this machine's float32 kernels differ from the golden machine's ({', '.join(differ)}"
            "); exact goldens need kernels that round the same: remake them here with "
            "tests/data/imagenet_golden/make_golden.py")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("p", [1, 4, 16])
def test_matches_the_authors_sampler_bit_for_bit(p, backend, tiny_dirs):
    z, meta = golden(p)
    model = checkpoint.load(tiny_dirs(p))
    for i, case in enumerate(meta["cases"]):
        tokens = sample.generate_tokens(model, case["labels"], case["steps"], case["guidance"],
                                        case["seed"], backend)
        bits = np.packbits(tokens.numpy() > 0, axis=-1)
        images = sample.decode(model, tokens).numpy()
        where = f"p={p} {backend} case {case}"
        assert np.array_equal(bits, z[f"tokens_{i}"]), (
            f"{where}: {(bits != z[f'tokens_{i}']).mean():.4f} of the token bytes differ; "
            + _platform_note(meta))
        assert np.array_equal(images, z[f"images_{i}"]), (
            f"{where}: tokens equal, {(images != z[f'images_{i}']).mean():.4f} of the pixels "
            "differ (decoding); " + _platform_note(meta))


def test_guidance_schedule():
    assert sample.guidance_at(1.0, 5, 10) == 1.0
    assert sample.guidance_at(4.0, 0, 16) == 1.0  # the first step: no guidance
    assert sample.guidance_at(4.0, 8, 16) == 1.0 + 3.0 * 8 / 16
    assert sample.guidance_at(0.5, 3, 16) == 1.0


# -- the architecture from the weights' shapes ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_convert_recognises_every_released_preset(name):
    """From the shapes alone (meta tensors: no memory) convert finds the architecture and the
    preset, and the default guidance is the authors' for it."""
    spec = PRESETS[name].spec
    shapes = pt_files.expected_shapes(spec, with_vae=True)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    vae = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    ae = pt_files.infer_autoencoder(vae, "x")
    found = pt_files.infer_spec(sd, ae, "x")
    assert found == spec and match_preset(found) == name
    assert (found.num_blocks, found.parallel_num) == (256 // spec.parallel_num,
                                                      spec.parallel_num)
    counts = sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith("vae."))
    # the README's parameter counts (the class embedding included; the autoencoder not)
    assert abs(counts / 1e6 - {"imagenet-b-1x": 242, "imagenet-b-4x": 260,
                                "imagenet-b-16x": 260, "imagenet-l-1x": 527,
                                "imagenet-h-1x": 1000}[name]) < 0.04 * counts / 1e6


def test_a_512_model_is_custom():
    spec = ImageNetSpec(**{**PRESETS["imagenet-b-1x"].spec.architecture(), "image_size": 512})
    assert spec.num_tokens == 1024 and match_preset(spec) == "custom"


# -- convert: safe and strict --------------------------------------------------------------------


def _convert(*args):
    return CliRunner().invoke(export_app, ["convert", *map(str, args)])


def test_convert_cli_writes_a_loadable_directory(tiny_dirs, tmp_path):
    src = tiny_dirs(4) / tiny.PT_DIR
    model_pt, ae_pt = (src / n for n in tiny.pt_names(4))
    out = tmp_path / "conv"
    r = _convert(model_pt, "--autoencoder", ae_pt, "--out", out)
    assert r.exit_code == 0, r.output
    assert "4 tokens per step" in r.output and "preset: custom" in r.output
    info = json.loads((out / "bitdance_rt.json").read_text())
    assert info["family"] == "imagenet" and info["source"]["weights"] == "ema"
    ckpt = torch.load(model_pt, weights_only=False)
    model = checkpoint.load(out)
    for k, v in model.transformer.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    # --weights model, converted again over the earlier output; the user's file stays
    (out / "notes.txt").write_text("mine")
    r = _convert(model_pt, "--out", out, "--weights", "model")
    assert r.exit_code == 0, r.output
    assert "using the autoencoder stored in" in r.output
    assert (out / "notes.txt").read_text() == "mine"
    model = checkpoint.load(out)
    assert json.loads((out / "bitdance_rt.json").read_text())["source"]["weights"] == "model"
    for k, v in model.transformer.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert not torch.equal(ckpt["model"]["norm.weight"], ckpt["ema"]["norm.weight"])


def test_convert_refuses_a_foreign_directory(tiny_dirs, tmp_path):
    model_pt = tiny_dirs(1) / tiny.PT_DIR / tiny.pt_names(1)[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    one_line_error(_convert(model_pt, "--out", foreign), "not an earlier converted checkpoint")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, form):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    payload = {"ema": {"emb_norm.weight": _RunsCode(marker)}}
    if form == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    one_line_error(_convert(evil, "--out", tmp_path / "out"), "was not loaded",
                   "could run code")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_training_arguments_are_read_without_running_code(tiny_dirs):
    """The authors' files hold an argparse.Namespace; it is rebuilt as data."""
    ckpt = pt_files.read_pt(tiny_dirs(1) / tiny.PT_DIR / tiny.pt_names(1)[0], "model")
    assert ckpt["args"].parallel_num == 1 and ckpt["epochs"] == 1


def _variant(tiny_dirs, tmp_path, change, ae_change=None):
    src = tiny_dirs(1) / tiny.PT_DIR
    model_pt, ae_pt = (src / n for n in tiny.pt_names(1))
    ckpt = torch.load(model_pt, weights_only=False)
    change(ckpt["ema"])
    torch.save(ckpt, tmp_path / "m.pt")
    ae = torch.load(ae_pt, weights_only=False)
    if ae_change:
        ae_change(ae["state_dict"])
    torch.save(ae, tmp_path / "ae.pt")
    return _convert(tmp_path / "m.pt", "--autoencoder", tmp_path / "ae.pt", "--out",
                    tmp_path / "out")


@pytest.mark.parametrize("change, ae_change, words", [
    (lambda sd: sd.pop("layers.1.ffn_norm.weight"), None, ["missing key",
                                                            "'layers.1.ffn_norm.weight'"]),
    (lambda sd: sd.update(extra=torch.zeros(1)), None, ["unexpected key 'extra'"]),
    (lambda sd: sd.update({"head.net.final_layer.linear.bias": torch.zeros(7)}), None,
     ["'head.net.final_layer.linear.bias' has shape [7]"]),
    (lambda sd: sd.update({"norm.weight": torch.zeros(128, dtype=torch.long)}), None,
     ["not floating point"]),
    (lambda sd: sd["layers.0.attention.wo.weight"].view(-1)[5:7].fill_(float("nan")), None,
     ["'layers.0.attention.wo.weight' holds 2 NaN"]),
    (lambda sd: None, lambda ae: ae.update({"decoder.mystery": torch.zeros(1)}),
     ["unexpected key 'decoder.mystery'"]),
    (lambda sd: None, lambda ae: ae.update({"decoder.conv_in.bias": torch.zeros(3)}),
     ["'decoder.conv_in.bias' has shape [3]"]),
])
def test_convert_checks_keys_and_shapes(tiny_dirs, tmp_path, change, ae_change, words):
    one_line_error(_variant(tiny_dirs, tmp_path, change, ae_change), *words)
    assert not (tmp_path / "out").exists()


def test_training_only_autoencoder_keys_are_left_out(tiny_dirs, tmp_path):
    r = _variant(tiny_dirs, tmp_path, lambda sd: None,
                 lambda ae: ae.update({"loss.logvar": torch.zeros(())}))
    assert r.exit_code == 0, r.output
    assert "left out 1 training-only keys (loss.logvar" in r.output


def test_the_autoencoder_file_wins_over_the_models_copy(tiny_dirs, tmp_path):
    """As the authors' sampler loads it (load_vae_weight after the model's weights)."""
    r = _variant(tiny_dirs, tmp_path, lambda sd: None,
                 lambda ae: ae["decoder.conv_out.bias"].fill_(0.25))
    assert r.exit_code == 0, r.output
    model = checkpoint.load(tmp_path / "out")
    assert torch.equal(model.ae.decoder.conv_out.bias, torch.full((3,), 0.25))


# -- the checkpoint directory and the CLI --------------------------------------------------------


def test_make_tiny_cli_writes_both_forms(tmp_path):
    out = tmp_path / "t16"
    r = CliRunner().invoke(export_app, ["make-tiny", "--family", "imagenet", "--parallel-num",
                                        "16", "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["ae.safetensors", "bitdance_rt.json", "model.safetensors",
                     "pt/BitDance_tiny_16x.pt", "pt/ae_tiny.pt"]
    assert checkpoint.load(out, weights=False).spec == tiny.tiny_spec(16)
    ckpt = pt_files.read_pt(out / "pt" / "BitDance_tiny_16x.pt", "model")
    assert tiny.digest(ckpt["model"]) == tiny.digest(tiny.tiny_states(16, 3)[0])
    one_line_error(CliRunner().invoke(export_app, ["make-tiny", "--family", "imagenet",
                                                   "--out", str(out)]), "not empty")
    one_line_error(CliRunner().invoke(export_app, ["make-tiny", "--family", "imagenet",
                                                   "--parallel-num", "64", str(tmp_path / "x")]),
                   "--parallel-num must be one of [1, 4, 16]")


def _gen(*args):
    return CliRunner().invoke(rt_app, ["generate", "--device", "cpu", "--no-progress", *args])


def test_generate_cli_is_the_authors_sample(tiny_dirs, tmp_path):
    """``--seed S --class C --num-images B`` gives their ``sample(tensor([C] * B))`` images,
    by name or index, with either backend."""
    from PIL import Image

    ckpt = tiny_dirs(16)
    model = checkpoint.load(ckpt)
    want = sample.generate(model, [207, 207], steps=2, guidance=3.0, seed=9).numpy()
    for label, backend in (("golden retriever", "torch"), ("207", "reference")):
        out = tmp_path / backend / "dog.png"
        r = _gen("-c", str(ckpt), "--class", label, "-n", "2", "--seed", "9", "--steps", "2",
                 "--guidance", "3", "--backend", backend, "--out", str(out))
        assert r.exit_code == 0, r.output
        for i in range(2):
            with Image.open(out.with_name(f"dog_{i}.png")) as im:
                assert np.array_equal(np.asarray(im), want[i])
                assert im.text["class"] == "207" and im.text["class_name"] == "golden retriever"
                assert im.text["family"] == "imagenet" and im.text["image_index"] == str(i)
    r = _gen("-c", str(ckpt), "--class", "0", "--steps", "1", "--out", str(tmp_path / "one.png"))
    assert r.exit_code == 0 and (tmp_path / "one.png").is_file(), r.output


def test_generate_cli_errors(tiny_dirs, tmp_path, tiny_ckpt):
    ckpt = str(tiny_dirs(4))
    out = str(tmp_path / "x.png")
    one_line_error(_gen("-c", ckpt, "--prompt", "a dog", "--out", out), "takes --class",
                   "not --prompt")
    one_line_error(_gen("-c", ckpt, "--out", out), "give --class")
    one_line_error(_gen("-c", str(tiny_ckpt), "--class", "3", "--out", out),
                   "text-to-image model")
    one_line_error(_gen("--class", "3", "--out", out), "built-in demo model")
    one_line_error(_gen("-c", ckpt, "--class", "goldn retriever", "--out", out),
                   "did you mean 'golden retriever' (207)")
    one_line_error(_gen("-c", ckpt, "--class", "1000", "--out", out), "classes 0 to 999")
    one_line_error(_gen("-c", ckpt, "--class", "crane", "--out", out), "134", "517")
    one_line_error(_gen("-c", ckpt, "--class", "1", "--height", "256", "--out", out),
                   "128x128 images only")
    one_line_error(_gen("-c", ckpt, "--class", "1", "--backend", "onnxruntime", "--out", out),
                   "--export-dir")
    one_line_error(_gen("-c", ckpt, "--class", "1", "--backend", "tensorrt", "--out", out),
                   "--export-dir")
    one_line_error(_gen("-c", ckpt, "--class", "1", "--backend", "onnx", "--out", out),
                   "torch, reference, onnxruntime, tensorrt")
    one_line_error(_gen("-c", ckpt, "--class", "1", "--guidance", "0.5", "--out", out),
                   "guidance")
    assert not list(tmp_path.glob("*.png"))


def test_a_damaged_directory_is_one_line(tiny_dirs, tmp_path):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(tiny_dirs(1), d, ignore=shutil.ignore_patterns("pt"))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        checkpoint.load(d)
    info = json.loads((d / "bitdance_rt.json").read_text())
    info["architecture"]["dim"] = 100
    (d / "bitdance_rt.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="not a multiple of 64"):
        checkpoint.load(d, weights=False)


# -- classes --------------------------------------------------------------------------------------


def test_the_class_list():
    table = synsets()
    wnids = [w for w, _ in table]
    assert len(table) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert [class_name(i) for i in (0, 1, 207, 281, 999)] == [
        "tench", "goldfish", "golden retriever", "tabby", "toilet tissue"]
    assert resolve_class("Great_White_Shark") == resolve_class("n01484850") == 2
    assert resolve_class(" 17 ") == 17
    with pytest.raises(BitDanceError, match="by index"):
        resolve_class("tench", num_classes=10)
