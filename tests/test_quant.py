"""Quantized linear layers and quantized checkpoints: the arithmetic of every recipe against
independent formulas, loading (strict keys, stored dtypes), generation, and the Q/DQ export."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bitdance_rt.calibration.quantize import bf16_ceil, quantize_checkpoint, quantize_linear
from bitdance_rt.calibration.recipes import HEAD, LLM, RECIPES, get_recipe
from bitdance_rt.calibration.stats import calibrate_checkpoint
from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.cli import rt_app
from bitdance_rt.errors import BitDanceError, CheckpointError
from bitdance_rt.models.quant import LAYOUT_FILE, QuantLinear, fake_quantize, quantize_codes
from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime.session import Session

REQ = dict(height=256, width=896, steps=2, guidance=4.0)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen)


def bf16_representable(t):
    return torch.equal(t.float(), t.float().to(torch.bfloat16).float())


# ----------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_weight_quantization_error_is_that_of_the_format(fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    w = rand(96, 80, gen=gen) * torch.rand(96, 1, generator=gen) * 3  # rows of different scale
    w[5] = 0  # a dead row keeps scale 1 and codes 0
    t = quantize_linear(w, get_recipe(f"{fmt}-weight"))
    scale = t["weight_scale"]
    assert t["weight"].dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    assert bf16_representable(scale) and (scale > 0).all(), f"seed {seed}"
    deq = t["weight"].float() * scale[:, None]
    qmax = 127 if fmt == "int8" else 448
    live = w.abs().amax(1) > 0
    # no row saturates: the scale is at least amax / qmax
    assert (scale[live] * qmax >= w.abs().amax(1)[live]).all(), f"seed {seed}"
    # ... and is not needlessly coarse: at most amax / qmax rounded up to bf16
    assert (scale[live] <= w.abs().amax(1)[live] / qmax * (1 + 2 ** -7)).all(), f"seed {seed}"
    if fmt == "int8":
        assert ((deq - w).abs() <= scale[:, None] / 2 + 1e-7).all(), f"seed {seed}"
    else:  # 3 mantissa bits: half an ulp is 1/16 of the value (normal range)
        normal = (w.abs() / scale[:, None]) >= 2 ** -6
        assert ((deq - w).abs()[normal] <= w.abs()[normal] / 16 + 1e-7).all(), f"seed {seed}"
    assert torch.equal(deq[5], torch.zeros(80)), f"seed {seed}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_ceil_rounds_up_to_a_representable_value(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1000, generator=gen) * 10 + 1e-6
    y = bf16_ceil(x)
    assert bf16_representable(y), f"seed {seed}"
    assert (y >= x).all() and (y <= x * (1 + 2 ** -7)).all(), f"seed {seed}"


def test_quantize_codes_follow_onnx_quantizelinear():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0, 1000.0, -1000.0])
    assert quantize_codes(x, torch.tensor(1.0), "int8").tolist() == [0, 2, 2, 0, -2, 127, -128,
                                                                        127, -128]
    fp8 = quantize_codes(x, torch.tensor(1.0), "fp8").float()
    assert fp8[-2:].tolist() == [448.0, -448.0]  # saturates (no NaN)
    assert torch.isfinite(fake_quantize(x * 1e3, torch.tensor(2.0), 0)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_quant_linear_computes_the_recipe(recipe, seed):
    """QuantLinear against the recipe written out independently: smooth, quantize the input
    with the static scale (round half to even, saturate), multiply by the dequantized
    weight."""
    r = get_recipe(recipe)
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(48, 40)
    with torch.no_grad():  # the layer's values from the seed too, not from the global RNG
        lin.weight.copy_(rand(40, 48, gen=gen) / 48 ** 0.5)
        lin.bias.copy_(rand(40, gen=gen) * 0.1)
    x = rand(3, 5, 48, gen=gen) * (1 + 10 * (torch.arange(48) == 7))  # an outlier channel
    stats = (x.abs().max(), x.abs().reshape(-1, 48).amax(0))
    t = quantize_linear(lin.weight.detach(), r, stats)
    q = QuantLinear(48, 40, True, r.fmt, r.activation, r.smooth)
    q.load_state_dict({**t, "bias": lin.bias.detach()}, assign=True)
    xs = x * t["pre_quant_scale"] if r.smooth else x
    if r.activation:
        s = t["input_scale"]
        if r.fmt == "int8":
            xs = torch.clamp(torch.round(xs / s), -128, 127) * s
        else:
            xs = (xs / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    w = t["weight"].float() * t["weight_scale"][:, None]
    torch.testing.assert_close(q(x), xs @ w.T + lin.bias.detach(), rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"seed {seed}: {m}")
    # and the result approximates the float layer (the recipe's precision)
    y = lin(x).detach()
    err = ((q(x) - y).norm() / y.norm()).item()
    assert err < {"int8": 0.03, "fp8": 0.1}[r.fmt], f"seed {seed}: relative error {err}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothquant_keeps_the_product_and_helps_outlier_channels(seed):
    gen = torch.Generator().manual_seed(seed)
    w = rand(64, 128, gen=gen) / 11
    x = rand(512, 128, gen=gen)
    x[:, :4] *= 60  # activation outliers in a few channels, as in trained LLMs
    stats = (x.abs().max(), x.abs().amax(0))
    sq = quantize_linear(w, get_recipe("int8-sq"), stats)
    pqs = sq["pre_quant_scale"]
    # the smoothing alone is exact up to float rounding
    torch.testing.assert_close((x * pqs) @ (w / pqs).T, x @ w.T, rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"seed {seed}: {m}")

    def sqnr(recipe):
        q = QuantLinear(128, 64, False, "int8", "static", recipe.smooth)
        q.load_state_dict(quantize_linear(w, recipe, stats), assign=True)
        y = x @ w.T
        return 10 * torch.log10(y.pow(2).sum() / (q(x) - y).pow(2).sum()).item()

    plain = get_recipe("int8-sq").__class__("w8a8", "int8", "static", smooth=False)
    smoothed, unsmoothed = sqnr(get_recipe("int8-sq")), sqnr(plain)
    assert smoothed > unsmoothed + 3, f"seed {seed}: SQNR {smoothed:.1f} vs {unsmoothed:.1f} dB"


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def calib16(tiny16_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "tiny16.calib"
    calibrate_checkpoint(tiny16_ckpt, path, ["a red apple", "a blue door"], steps=2, height=256,
                         width=896, device="cpu")
    return path


@pytest.fixture(scope="module")
def quantized(tiny16_ckpt, calib16, tmp_path_factory):
    base = tmp_path_factory.mktemp("quantized")
    for r in RECIPES:
        quantize_checkpoint(tiny16_ckpt, r, base / r, calib16)
    return {r: base / r for r in RECIPES}


def test_quantized_checkpoint_layout(quantized, tiny16_ckpt):
    d = quantized["int8-sq"]
    layout = json.loads((d / LAYOUT_FILE).read_text())
    assert layout["recipe"] == "int8-sq" and layout["calibration"]["samples"] == 2
    mods = layout["modules"]
    assert "model.layers.0.mlp.down_proj" in mods[LLM]
    assert "net.final_layer.linear" not in mods[HEAD] and "net.cond_embed" in mods[HEAD]
    llm = load_file(d / "model.safetensors")
    assert llm["model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
    for key in ("weight_scale", "input_scale", "pre_quant_scale"):
        assert f"model.layers.1.self_attn.q_proj.{key}" in llm
    assert llm["model.embed_tokens.weight"].dtype == torch.float32  # untouched
    head = load_file(quantized["fp8"] / "vision_head.safetensors")
    assert head["net.res_blocks.0.w1.weight"].dtype == torch.float8_e4m3fn
    assert head["net.final_layer.linear.weight"].dtype == torch.float32
    # everything else is copied unchanged
    for name in ("ae.safetensors", "projector.safetensors", "tokenizer.json", "config.json"):
        assert (d / name).read_bytes() == (tiny16_ckpt / name).read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_checkpoint_swaps_in_quantized_layers(quantized, dtype):
    m = load_checkpoint(quantized["fp8-weight"], dtype=dtype)
    q = m.llm.model.layers[0].mlp.up_proj
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.float8_e4m3fn
    assert q.weight_scale.dtype == dtype
    assert isinstance(m.head.net.final_layer.linear, torch.nn.Linear)
    assert not isinstance(m.head.net.final_layer.linear, QuantLinear)


def test_loading_stays_strict(quantized, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(quantized["int8-sq"], d)
    llm = load_file(d / "model.safetensors")
    missing = dict(llm)
    del missing["model.layers.0.mlp.up_proj.input_scale"]
    save_file(missing, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing key .*input_scale"):
        load_checkpoint(d)
    wrong = dict(llm)
    wrong["model.layers.0.mlp.up_proj.weight"] = wrong["model.layers.0.mlp.up_proj.weight"].float()
    save_file(wrong, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="quantization.json says torch.int8"):
        load_checkpoint(d)


def test_quantize_refuses_what_it_cannot_do(tiny16_ckpt, tiny_ckpt, calib16, quantized, tmp_path):
    with pytest.raises(BitDanceError, match="pass --calibration"):
        quantize_checkpoint(tiny16_ckpt, "fp8", tmp_path / "a")
    with pytest.raises(BitDanceError, match="made on other weights .*calibrate --checkpoint"):
        quantize_checkpoint(tiny_ckpt, "int8-weight", tmp_path / "b", calib16)
    with pytest.raises(BitDanceError, match="already quantized"):
        quantize_checkpoint(quantized["fp8"], "int8-weight", tmp_path / "c")
    with pytest.raises(BitDanceError, match="unknown --recipe"):
        quantize_checkpoint(tiny16_ckpt, "int4", tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_generate_cli_runs_a_quantized_checkpoint(quantized, tmp_path):
    """``bitdance-rt generate`` loads it like any checkpoint: its PNG is the library's image
    of the quantized model, which is not the float model's."""
    out = tmp_path / "q.png"
    r = CliRunner().invoke(rt_app, ["generate", "-p", "a red apple", "-c",
                                    str(quantized["int8-weight"]), "--height", "256", "--width",
                                    "896", "--steps", "2", "--guidance", "4", "--device", "cpu",
                                    "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    img = torch.from_numpy(np.array(Image.open(out)))
    req = GenerationRequest("a red apple", seed=42, **REQ)
    ref = Session.open(quantized["int8-weight"], device="cpu").generate(req)[0][0]
    assert torch.equal(img, ref)


# ----------------------------------------------------------------------------------------------
# Export


def _qdq_export(model, graph: str, out):
    """One graph of ``model`` exported with the Q/DQ translations (what the exporter does for a
    quantized checkpoint)."""
    from bitdance_rt.export import head_step
    from bitdance_rt.export.common import OPSET, export_onnx
    from bitdance_rt.export.qdq import onnx_translation_table, required_opset

    gdef = {"head_step": head_step.graph_def}[graph](model)
    return export_onnx(gdef, out, required_opset(model, OPSET), onnx_translation_table())


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("recipe", ["int8-sq", "int8-weight"])
def test_head_step_exports_qdq_pairs_that_onnxruntime_runs(quantized, recipe, tmp_path, seed):
    import onnx
    import onnxruntime as ort

    from bitdance_rt.export import head_step

    model = load_checkpoint(quantized[recipe])
    _qdq_export(model, "head_step", tmp_path)
    g = onnx.load(str(tmp_path / "head_step.onnx"))
    ops = [n.op_type for n in g.graph.node]
    inits = {i.name: i for i in g.graph.initializer}
    n_layers = 4 * model.spec.head.depth_latent  # wqkv, wo, w1, w2 per block
    weight_dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dq) == n_layers
    assert ops.count("QuantizeLinear") == (n_layers if recipe == "int8-sq" else 0)
    gen = torch.Generator().manual_seed(seed)
    feeds = head_step.random_inputs(model, gen, 2, guided=True, final=False)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / "head_step.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    ref = head_step.pytorch_outputs(model, feeds)["x_next"].numpy()
    # weight-only: float rounding only; W8A8: an activation code may round the other way
    tol = 1e-4 if recipe == "int8-weight" else 2e-2
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= tol, f"seed {seed}: max error {err:.3g} of the largest output"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("recipe", ["fp8", "fp8-weight"])
def test_fp8_scaled_matmul_path_computes_what_the_cpu_emulates(recipe, monkeypatch, seed):
    """The CUDA path (``torch._scaled_mm`` with row-wise scales, which this torch also runs on
    the CPU) against the dequantizing path with the same activation quantization: static for
    ``fp8``, per token (``emulate_fp8_gemm``) for ``fp8-weight``."""
    from bitdance_rt.models.quant import _fp8_matmul

    r = get_recipe(recipe)
    gen = torch.Generator().manual_seed(seed)
    w = rand(48, 64, gen=gen) / 8
    x = rand(2, 9, 64, gen=gen) * torch.linspace(0.2, 3, 64)
    stats = (x.abs().max(), x.abs().reshape(-1, 64).amax(0))
    q = QuantLinear(64, 48, False, "fp8", r.activation, dtype=torch.bfloat16)
    q.load_state_dict({k: v if k == "weight" else v.bfloat16()
                       for k, v in quantize_linear(w, r, stats).items()}, assign=True)
    xb = x.bfloat16()
    fast = _fp8_matmul(xb.reshape(-1, 64), q).view(2, 9, 48).float()
    monkeypatch.setattr(QuantLinear, "emulate_fp8_gemm", True)
    slow = q(xb).float()
    # the same E4M3 operands; the two differ by bf16 roundings only, well below the error of
    # the quantization itself (so a wrong scale or a transposed one would show)
    exact = x @ w.T
    assert (fast - slow).norm() < 0.3 * (slow - exact).norm(), f"seed {seed}"
    torch.testing.assert_close(fast, slow, rtol=2 ** -7, atol=1e-2 * slow.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", [0])
def test_cuda_fp8_layers_use_scaled_matmuls(seed):
    """On a GPU with FP8 tensor cores a bf16 E4M3 layer takes the ``_scaled_mm`` path and
    matches the CPU emulation of it; elsewhere it dequantizes and matches the CPU exactly."""
    from bitdance_rt.models.quant import scaled_mm_available

    gen = torch.Generator().manual_seed(seed)
    w = rand(256, 512, gen=gen) / 20
    x = rand(2, 64, 512, gen=gen)
    for recipe in ("fp8", "fp8-weight"):
        r = get_recipe(recipe)
        t = quantize_linear(w, r, (x.abs().max(), x.abs().reshape(-1, 512).amax(0)))
        q = QuantLinear(512, 256, False, "fp8", r.activation, dtype=torch.bfloat16)
        q.load_state_dict({k: v if k == "weight" else v.bfloat16() for k, v in t.items()},
                          assign=True)
        cpu = q(x.bfloat16())  # the CPU's path: dequantized weights (static Q/DQ for fp8)
        QuantLinear.emulate_fp8_gemm = True
        try:
            emulated = q(x.bfloat16()).float()
        finally:
            QuantLinear.emulate_fp8_gemm = False
        gpu = q.cuda()(x.bfloat16().cuda()).float().cpu()
        if scaled_mm_available(torch.device("cuda")):
            assert (gpu - emulated).norm() < 0.3 * (emulated - x @ w.T).norm(), \
                f"seed {seed}, {recipe}"
        else:  # both recipes: the GPU dequantizes as the CPU does
            torch.testing.assert_close(gpu, cpu.float(), rtol=1e-2, atol=1e-2,
                                       msg=lambda m: f"seed {seed}, {recipe}: {m}")
        q.cpu()
