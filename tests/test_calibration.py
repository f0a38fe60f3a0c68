"""Calibration (prompts, statistics, the calibration file), the recipes' layer table, the
memory budget, and (slow) the whole Q/DQ export of a quantized checkpoint: `check` against
the torch backend and TensorRT-RTX engine builds."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bitdance_rt.memory import (GIB, PeakTracker, memory_budget, meta_model,
                                            peak_bytes, state_bytes)
from bitdance_rt.calibration.prompts import PROMPTS, load_prompts, prompts_hash
from bitdance_rt.calibration.recipes import (HEAD, LLM, PROJECTOR, RECIPES, choose,
                                             linear_choices)
from bitdance_rt.calibration.stats import Calibration
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import BitDanceError
from bitdance_rt.models.head import DiffusionHead
from bitdance_rt.models.projector import Projector
from bitdance_rt.models.qwen3 import Qwen3ForCausalLM
from bitdance_rt.spec import preset


# ----------------------------------------------------------------------------------------------
# Prompts


def test_prompt_set():
    assert len(PROMPTS) >= 128 and len(set(PROMPTS)) == len(PROMPTS)
    words = [len(p.split()) for p in PROMPTS]
    assert min(words) <= 2 and max(words) >= 30  # from two words to a paragraph
    picked = load_prompts(samples=8)
    assert len(picked) == 8 and picked[0] == PROMPTS[0] and picked[-1] != PROMPTS[7]
    assert prompts_hash(picked) != prompts_hash(picked[::-1])


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\na cat\n  a dog  \n")
    assert load_prompts(f) == ["a cat", "a dog"]
    with pytest.raises(BitDanceError, match="more than the 2 prompts"):
        load_prompts(f, samples=3)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(BitDanceError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("name", ["14b-64x", "mid", "tiny"])
def test_layer_table_covers_every_linear_layer(name):
    spec = preset(name)
    with torch.device("meta"):
        parts = {LLM: Qwen3ForCausalLM(spec.llm), HEAD: DiffusionHead(spec.head),
                 PROJECTOR: Projector(spec.ae.z_channels, spec.llm.hidden_size)}
    quantized = total = 0
    for comp, module in parts.items():
        for c in linear_choices(comp, module):
            n = module.get_submodule(c.name).weight.numel()
            if c.name != "lm_head":
                total += n
                quantized += n * c.quantized
    # every preset has layers of both kinds (linear_choices raised above if one had no rule)
    assert 0 < quantized < total, (quantized, total)
    # what stays in high precision is a small part of the Linear weights read per image
    if name == "14b-64x":
        assert quantized / total > 0.99
    with pytest.raises(BitDanceError, match="no quantization rule"):
        choose(HEAD, "net.new_layer")


# ----------------------------------------------------------------------------------------------
# Calibration


@pytest.fixture(scope="module")
def calib_run(tiny16_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "c.safetensors"
    r = CliRunner().invoke(export_app, [
        "calibrate", "-c", str(tiny16_ckpt), "-o", str(out), "--samples", "2", "--steps", "2",
        "--height", "256", "--width", "896", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_calibration_file_records_every_layer(calib_run, tiny16_ckpt):
    from bitdance_rt.checkpoint import load_checkpoint, weights_fingerprint

    out, output = calib_run
    assert "wrote" in output and "2 prompts" in output
    calib = Calibration.load(out)
    meta = calib.meta
    assert meta["weights_fingerprint"] == weights_fingerprint(tiny16_ckpt)
    assert meta["prompts_sha256"] == prompts_hash(load_prompts(samples=2))
    assert (meta["steps"], meta["height"], meta["width"]) == (2, 256, 896)
    model = load_checkpoint(tiny16_ckpt)
    names = {f"{LLM}/{n}" for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)}
    names |= {f"{HEAD}/{n}" for n, m in model.head.named_modules() if isinstance(m, nn.Linear)}
    assert set(calib.amax) == names
    for key, amax in calib.amax.items():
        ch = calib.channel_max[key]
        assert amax == pytest.approx(float(ch.max())) and amax > 0
        assert ch.shape == (model.llm.get_submodule(key.split("/")[1]).in_features
                            if key.startswith(LLM) else
                            model.head.get_submodule(key.split("/")[1]).in_features,)
    # the head's input projection sees x_0 of every block (the sampler's first draw) among
    # its inputs: its channel maxima bound those of the draws the loop makes (seed i, prompt i)
    from bitdance_rt.sampling import NoiseSource

    first = torch.zeros(32)
    for seed in (0, 1):
        noise = NoiseSource.from_seeds(seed, "cpu")
        for _ in range(256 * 896 // 256 // 16):
            x0 = noise.block(1, 16, 32, 2, "cpu")[0]
            first = torch.maximum(first, x0.abs().reshape(-1, 32).amax(0))
    assert (calib.channel_max[f"{HEAD}/net.input_proj"] >= first).all()
    # the LLM's first layer sees RMS-normalised inputs times the norm weights
    assert calib.channel_max[f"{LLM}/model.layers.0.self_attn.q_proj"].min() > 0
    calib.check_checkpoint(tiny16_ckpt)


def test_calibration_is_refused_for_another_checkpoint(calib_run, tiny_ckpt, tmp_path):
    out, _ = calib_run
    r = CliRunner().invoke(export_app, ["quantize", "-c", str(tiny_ckpt), "-r", "fp8",
                                        "--calibration", str(out), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2
    assert "made on other weights" in r.output and "bitdance-export calibrate" in r.output
    assert not (tmp_path / "q").exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a calibration file")
    with pytest.raises(BitDanceError, match="cannot be read as a calibration file"):
        Calibration.load(bad)


def test_quantize_cli(calib_run, tiny16_ckpt, tmp_path):
    out, _ = calib_run
    r = CliRunner().invoke(export_app, ["quantize", "-c", str(tiny16_ckpt), "-r", "int8-sq",
                                        "--calibration", str(out), "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "int8-sq: quantized 14 language model layers, 12 diffusion head layers" in r.output
    r = CliRunner().invoke(export_app, ["quantize", "-c", str(tiny16_ckpt), "-r", "fp8",
                                        "-o", str(tmp_path / "q2")])
    assert r.exit_code == 2 and "--calibration" in r.output


# ----------------------------------------------------------------------------------------------
# Memory budget


def test_peak_tracker_counts_live_storage():
    dev = torch.device("meta")

    def body():
        a = torch.empty(1024, device=dev)            # 4 KiB
        b = torch.empty(2048, device=dev)            # 8 KiB: 12 live
        v = b[:100].t()                              # a view: nothing new
        del a
        c = (b * 2).add_(1)                          # 8 KiB (in place adds nothing): 16 live
        del b, v, c
        return torch.empty(512, device=dev)          # 2 KiB

    known = torch.empty(10**6, device=dev)  # existed before: not counted, nor its views
    assert peak_bytes(lambda: (known[:10] * 1, body())[1], known) == 16 * 1024 + 40
    t = PeakTracker()
    with t:
        x = torch.empty(256, device=dev)
        del x
    assert t.current == 0 and t.peak == 1024


def _expected_weights(spec, recipe):
    """Bytes of the weights as loaded, from the parameter counts of a meta model and the
    recipe's table alone: bf16 everywhere, quantized Linear weights 1 byte per parameter
    plus their per-output-channel scales (and an input scale, a smoothing vector)."""
    r = RECIPES.get(recipe)
    with torch.device("meta"):
        llm, head = Qwen3ForCausalLM(spec.llm), DiffusionHead(spec.head)

    def nbytes(comp, module, prefix):
        total = 0
        for name, p in module.named_parameters(prefix=prefix):
            layer, _, leaf = name.rpartition(".")
            m = dict(module.named_modules(prefix=prefix)).get(layer)
            quantized = isinstance(m, nn.Linear) and choose(comp, layer).quantized
            if r and leaf == "weight" and quantized:
                total += p.numel() + 2 * m.out_features + 2 * (r.activation is not None) \
                    + 2 * m.in_features * r.smooth
            else:
                total += 2 * p.numel()
        return total

    return {"language model layers": nbytes(LLM, llm.model.layers, "model.layers")
            + 2 * llm.model.norm.weight.numel(),
            "token embeddings": 2 * llm.model.embed_tokens.weight.numel(),
            "diffusion head": nbytes(HEAD, head.net, "net")}


def test_memory_budget_ties_weights_to_parameter_counts():
    spec = preset("14b-64x")
    n_llm = sum(p.numel() for p in meta_model(spec).llm.model.layers.parameters())
    # the 14B LLM's layers: 13.2 B parameters, all of them read at every block step
    assert 13.1e9 < n_llm < 13.3e9
    for recipe in [None] + list(RECIPES):
        m = meta_model(spec, recipe)
        got = {"language model layers": state_bytes(m.llm.model.layers)
               + state_bytes(m.llm.model.norm),
               "token embeddings": state_bytes(m.llm.model.embed_tokens),
               "diffusion head": state_bytes(m.head.net)}
        assert got == _expected_weights(spec, recipe), recipe


def test_memory_budget_acceptance():
    """14b-64x at 1024x1024: fp8-weight fits a 24 GB card, bf16 does not; the lines are those
    the budget promises and add up."""
    spec = preset("14b-64x")
    bf16 = memory_budget(spec, None, 1024, 1024)
    fp8 = memory_budget(spec, "fp8-weight", 1024, 1024)
    assert fp8.fits(24) and not bf16.fits(24) and bf16.fits(48)
    for b in (bf16, fp8):
        assert {line.group for line in b.lines} == {"weights", "kv cache", "head buffers",
                                                    "cuda graphs", "activations", "runtime"}
        assert b.total == sum(line.nbytes for line in b.lines)
    # 13.2 B LLM parameters: 2 bytes each in bf16, 1 in E4M3 (plus scales)
    assert bf16.lines[0].nbytes / GIB == pytest.approx(13.21e9 * 2 / GIB, rel=0.01)
    assert fp8.lines[0].nbytes / GIB == pytest.approx(13.21e9 / GIB, rel=0.01)
    # the KV cache: 40 layers x 2 seqs x 8 heads x (256 + 4096 - 64) slots x 128 x 2 (k, v)
    assert fp8.group("kv cache") == 40 * 2 * 8 * 4288 * 128 * 2 * 2
    # the decoder's largest transient at 1024x1024 is a few 256-channel full-size maps
    decoder = fp8.lines[-2]
    assert decoder.group == "activations" and 1.0 < decoder.nbytes / GIB < 4.0
    r = CliRunner().invoke(rt_app, ["memory", "--preset", "14b-64x", "--recipe", "fp8-weight",
                                    "--height", "1024", "--width", "1024"])
    assert r.exit_code == 0 and "24 GB yes" in r.output and "E4M3" in r.output, r.output
    r = CliRunner().invoke(rt_app, ["memory", "--preset", "14b-64x", "--height", "1000"])
    assert r.exit_code == 2 and "not supported" in r.output


# ----------------------------------------------------------------------------------------------
# The whole export (slow)


@pytest.fixture(scope="module")
def qdq_exports(calib_run, tiny16_ckpt, tmp_path_factory):
    """Every graph of the int8-weight, int8-sq and fp8 checkpoints exported with Q/DQ nodes."""
    from bitdance_rt.calibration.quantize import quantize_checkpoint
    from bitdance_rt.checkpoint import load_checkpoint
    from bitdance_rt.export import exporter

    base = tmp_path_factory.mktemp("qdq")
    out = {}
    for recipe in ("int8-weight", "int8-sq", "fp8"):
        ckpt = base / f"ckpt-{recipe}"
        quantize_checkpoint(tiny16_ckpt, recipe, ckpt, calib_run[0])
        model = load_checkpoint(ckpt)
        with torch.no_grad():
            exporter.export_model(model, base / recipe, source={"checkpoint": str(ckpt)})
        assert json.loads((base / recipe / "manifest.json").read_text())["opset"] >= 19
        out[recipe] = base / recipe
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["int8-weight", "int8-sq"])
def test_int8_qdq_export_passes_check(qdq_exports, recipe):
    """Against the torch backend running the same recipe (activation Q/DQ: one step's gate)."""
    r = CliRunner().invoke(export_app, ["check", str(qdq_exports[recipe])])
    assert r.exit_code == 0, r.output
    if recipe == "int8-sq":
        assert "<= 0.03" in r.output


@pytest.mark.slow
@pytest.mark.trt
@pytest.mark.parametrize("recipe", ["int8-sq", "fp8"])
def test_tensorrt_rtx_builds_engines_from_qdq_graphs(qdq_exports, recipe, tmp_path):
    """A plain TensorRT-RTX parse and build (ahead of time, no GPU) of the LLM block step and the
    head step: the Q/DQ pairs parse and the builder accepts them in a strongly typed network."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed "
                              "(pip install tensorrt-rtx-cu12)")
    import onnx

    for graph in ("block_step", "head_step"):
        path = qdq_exports[recipe] / f"{graph}.onnx"
        g = onnx.load(str(path), load_external_data=False)
        assert any(n.op_type == "QuantizeLinear" for n in g.graph.node)
        log = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(log)
        network = builder.create_network(
            1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, log)
        assert parser.parse_from_file(str(path)), [str(parser.get_error(i))
                                                   for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = [2 if d == -1 else d for d in t.shape]  # 2 images / rows
            if t.name in ("k_cache", "v_cache"):
                shape[3] = 32  # cache slots
            profile.set_shape(t.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.SM89, 0)
        assert builder.build_serialized_network(network, config) is not None
