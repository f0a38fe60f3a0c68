"""Quantization recipes for the class-conditional ImageNet family: the layer table covers its
transformer, `bitdance-export quantize` writes a directory every command loads (the same tokens
as quantizing in memory), the weight-only recipes pass the family's gate (teacher-forced token
agreement against the bfloat16 floor) and a broken scale fails it, the activation recipes are
refused in one line, and a quantized checkpoint exports and runs in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt.calibration.quantize import quantize_model
from bitdance_rt.calibration.recipes import HEAD, TRANSFORMER, linear_choices
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.imagenet import checkpoint, quality, sample, tiny
from bitdance_rt.imagenet.spec import PRESETS
from bitdance_rt.imagenet.transformer import ClassConditionalTransformer
from bitdance_rt.models.quant import QuantLinear
from conftest import one_line_error


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("inq") / "ckpt", 4, 5)


@pytest.fixture(scope="module")
def quantized(ckpt, tmp_path_factory):
    out = {}
    for recipe in quality.RECIPES:
        d = tmp_path_factory.mktemp("inq") / recipe
        r = CliRunner().invoke(export_app, ["quantize", "-c", str(ckpt), "--recipe", recipe,
                                            "--out", str(d)])
        assert r.exit_code == 0, r.output
        out[recipe] = d
    return out


@pytest.mark.parametrize("name", ["imagenet-b-16x", "imagenet-h-1x"])
def test_layer_table_covers_the_transformer(name):
    with torch.device("meta"):
        t = ClassConditionalTransformer(PRESETS[name].spec)
    quantized = total = 0
    for comp, module in ((TRANSFORMER, t), (HEAD, t.head)):
        for c in linear_choices(comp, module):  # raises where a layer has no rule
            n = module.get_submodule(c.name).weight.numel()
            total += n
            quantized += n * c.quantized
    seen = {c.name for c in linear_choices(TRANSFORMER, t)}
    assert not any(n.startswith("head.") for n in seen)   # the head has its own rules
    assert quantized / total > 0.97, (quantized, total)


@pytest.mark.parametrize("seed", [3])
def test_quantized_directory_loads_to_the_in_memory_quantization(ckpt, quantized, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 3).tolist()
    for recipe, d in quantized.items():
        layout = json.loads((d / "quantization.json").read_text())
        assert layout["recipe"] == recipe and set(layout["modules"]) == {TRANSFORMER, HEAD}
        model = checkpoint.load(d)
        assert sum(isinstance(m, QuantLinear) for m in model.transformer.modules()) == sum(
            len(v) for v in layout["modules"].values())
        want = sample.generate_tokens(quantize_model(checkpoint.load(ckpt), recipe), labels, 3,
                                      3.0, seed)
        got = sample.generate_tokens(model, labels, 3, 3.0, seed)
        assert torch.equal(want, got), (recipe, seed, labels)
        assert (d / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat(
            ).st_size


def test_generate_reads_a_quantized_directory(quantized, tmp_path):
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(quantized["int8-weight"]), "--class",
                                    "2", "--steps", "2", "--no-progress", "--out",
                                    str(tmp_path / "q.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q.png").is_file()


def test_refusals(ckpt, quantized, tmp_path):
    run = CliRunner().invoke
    for recipe in ("fp8", "int8-sq"):
        r = run(export_app, ["quantize", "-c", str(ckpt), "--recipe", recipe, "--out",
                             str(tmp_path / recipe)])
        one_line_error(r, "fp8-weight or int8-weight")
        assert not (tmp_path / recipe).exists()
    r = run(export_app, ["quantize", "-c", str(ckpt), "--recipe", "fp8-weight", "--calibration",
                         str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "c")])
    one_line_error(r, "--calibration")
    r = run(export_app, ["quantize", "-c", str(quantized["fp8-weight"]), "--recipe",
                         "int8-weight", "--out", str(tmp_path / "twice")])
    one_line_error(r, "already quantized")


@pytest.mark.parametrize("seed", [0])
def test_weight_only_recipes_pass_the_gate_and_a_broken_scale_fails_it(ckpt, seed):
    labels = list(range(8))
    rows = quality.evaluate(ckpt, labels, 6, 4.0, seed)
    by = {r.name: r.agreement for r in rows}
    assert by["float32"] == 1.0  # the method reproduces the reference exactly
    assert 0.5 < by["bfloat16"] < 1.0
    assert quality.verdicts(rows) == {"fp8-weight": True, "int8-weight": True}, rows
    # a 10% scale error in every quantized transformer layer: the gate must catch it
    fed = []
    tokens = sample.generate_tokens(checkpoint.load(ckpt), labels, 6, 4.0, seed, fed=fed)
    broken = quantize_model(checkpoint.load(ckpt), "int8-weight")
    for m in broken.transformer.modules():
        if isinstance(m, QuantLinear):
            m.weight_scale.mul_(1.1)
    bad = quality.Row("int8-weight", quality.forced_agreement(
        (tokens, torch.cat(fed, dim=1)), broken, labels, 6, 4.0, seed), 0.0)
    verdict = quality.verdicts([r for r in rows if r.name != "int8-weight"] + [bad])
    assert verdict["int8-weight"] is False, (bad, by)


@pytest.mark.slow  # 80 s: five graph exports (run with -m slow)
@pytest.mark.parametrize("seed", [2])
def test_a_quantized_checkpoint_exports_and_runs_in_onnxruntime(quantized, tmp_path, seed):
    d = quantized["int8-weight"]
    out = tmp_path / "export"
    r = CliRunner().invoke(export_app, ["--checkpoint", str(d), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"] == ["int8"] and m["opset"] >= 19
    model = checkpoint.load(d)
    graphs = sample.steps_for(checkpoint.load(d, weights=False), "onnxruntime", out)
    labels = [1, 7]
    want = sample.generate(model, labels, 3, 3.0, seed)
    got = sample.generate(model, labels, 3, 3.0, seed, graphs)
    assert (want == got).float().mean().item() >= 0.999, seed
