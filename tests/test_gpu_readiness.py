"""What the GPU paths do, checked on the CPU where the logic allows (issue 19): the GPU check
script's time budget, the record of which FP8 GEMM path ran, TensorRT versions without
attention layers, TensorRT-RTX on a GPU it has no target for, the stream engines run on, the
shapes and addresses a TensorRT context refuses, graph capture on the backend's device, and
``head_prepare`` slices of one size. Fake TensorRT modules and contexts stand in for the
library's API here; no engine is built or run with them. The tests marked ``gpu`` run the same
logic on a CUDA device (``bench/gpu_check.sh`` runs them)."""

import contextlib
import enum
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from bitdance_rt import trt as trt_compat
from bitdance_rt.errors import EngineError
from bitdance_rt.export import build
from bitdance_rt.models.quant import QuantLinear
from bitdance_rt.runtime import graphs
from bitdance_rt.runtime.backends import tensorrt_backend as trb
from bitdance_rt.runtime.backends.graph_runtime import GraphRuntime

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text, text
    return text


# -- 1. bench/gpu_check.sh fits one 600 s call ---------------------------------------------------


def test_gpu_check_limits_fit_one_call_and_the_header_says_them():
    """The steps' limits, their kill grace and the startup's timeouts add up to at most the
    script's budget (540 s: the run ends within 9 minutes); the header states every
    limit the script uses and names every file the script writes."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    steps = [(m.group(1).replace('"', "").replace("$recipe", r), int(m.group(2)))
             for m in re.finditer(r'^\s*step ("?[\w$]+"?) (\d+) ', text, re.M)
             for r in (["fp8", "fp8-weight"] if "$recipe" in m.group(1) else [""])]
    assert [n for n, _ in steps] == ["latency", "latency_fp8", "latency_fp8-weight",
                                     "attention", "pytest_gpu", "agreement", "throughput"]
    grace = int(re.search(r"^GRACE=(\d+)", text, re.M).group(1))
    budget = int(re.search(r"BUDGET=\$\{BUDGET:-(\d+)\} SCALE=\$\{SCALE:-1\}", text).group(1))
    startup = sum(int(t) for t in re.findall(r"^\s+timeout (\d+) ", text, re.M))
    total = startup + sum(limit + grace for _, limit in steps)
    assert budget <= 540 and total <= budget, (total, budget)
    header = text[:text.index("set -uo pipefail")]
    said = dict(re.findall(r"([\w-]+) (\d+) s", header.split("Limits:")[1].split(";")[0]))
    assert said == {"startup": str(startup), **{n: str(v) for n, v in steps}}
    assert f"At most {total} s in all" in header and f"BUDGET ({budget} s" in header
    written = set(re.findall(r'"\$OUT/([\w.-]+)"', text)) | {
        f"latency_{r}.json" for r in ("fp8", "fp8-weight")}
    written = {w for w in written if "$" not in w} | {"summary.txt", "log.txt"}
    for name in written:
        assert name in header, name
    assert f"({len(written)} files in $OUT; at most 8 can)" in header


def test_gpu_check_names_test_files_that_exist():
    """Every test file the GPU step runs is there (a missing one ran no test at all under
    pytest-xdist and passed), and each holds tests marked gpu."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    files = re.findall(r"\b(tests/test_\w+\.py)\b", text.split("step pytest_gpu", 1)[1]
                       .split("\nstep ", 1)[0])
    assert files, "the pytest_gpu step names no test file"
    for f in files:
        assert (ROOT / f).is_file(), f"bench/gpu_check.sh runs {f}, which does not exist"
        assert "mark.gpu" in (ROOT / f).read_text(), f"{f} has no test marked gpu"


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_writes_its_json_after_every_configuration(tiny_ckpt, tmp_path, monkeypatch):
    """bench/agreement.py rewrites its JSON after each configuration: a run stopped in the
    second one leaves the first one's row (the AR runs are replaced by a stub here, the
    checkpoints by the session's; the real runs are the next test's)."""
    agreement = load_bench("agreement")
    monkeypatch.setattr(agreement, "make_tiny", lambda *a, **k: tiny_ckpt)
    calls = []

    def stub(backend, plan, seed):
        calls.append(backend.name)
        if len(calls) == 3:  # the second configuration's reference run
            raise KeyboardInterrupt
        return torch.zeros(1, plan.tokens, 32), torch.zeros(1, 16 * plan.h, 16 * plan.w, 3)

    monkeypatch.setattr(agreement, "tokens_and_image", stub)
    out = tmp_path / "agreement.json"
    with pytest.raises(KeyboardInterrupt):
        agreement.main(["--device", "cpu", "--steps", "1", "--cases", "4:256x896,16:256x1024",
                        "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["configurations"] == 2
    assert [(r["parallel_num"], r["identical_tokens"]) for r in doc["rows"]] == [(4, 1.0)]


@pytest.mark.parametrize("seed", [3])
def test_agreement_tokens_and_image_are_generates(tiny_ckpt, seed):
    """One AR run gives the tokens of generate_tokens and the image of generate."""
    from bitdance_rt.checkpoint import load_checkpoint
    from bitdance_rt.request import GenerationRequest, ImagePlan, plan_for
    from bitdance_rt.runtime import generate, generate_tokens
    from bitdance_rt.runtime.backends.torch_backend import TorchBackend

    agreement = load_bench("agreement")
    model = load_checkpoint(tiny_ckpt)
    full = plan_for(model, GenerationRequest("a kite", 256, 896, steps=2, guidance=3.0, seed=1))
    plan = ImagePlan(h=4, w=4, cond_ids=full.cond_ids, uncond_ids=full.uncond_ids, steps=2,
                     guidance=3.0)
    tokens, image = agreement.tokens_and_image(TorchBackend(model), plan, seed)
    assert torch.equal(tokens, generate_tokens(TorchBackend(model), plan, seed)), f"seed {seed}"
    assert torch.equal(image, generate(TorchBackend(model), plan, seed)), f"seed {seed}"


# -- 2. which FP8 GEMM path ran -----------------------------------------------------------------


def fp8_layer(activation=None):
    q = QuantLinear(32, 16, True, "fp8", activation, dtype=torch.bfloat16)
    with torch.no_grad():
        q.weight.copy_((torch.arange(16 * 32).reshape(16, 32) % 7 - 3).to(torch.float8_e4m3fn))
        q.weight_scale.fill_(0.01)
        q.bias.zero_()
        if activation:
            q.input_scale.fill_(0.05)
    return q


@pytest.mark.parametrize("activation", [None, "static"])
def test_fp8_layers_count_the_path_they_took(activation, monkeypatch):
    """On the CPU an E4M3 layer dequantizes, and says so; the record names the path."""
    monkeypatch.setattr(QuantLinear, "fp8_paths", {"scaled_mm": 0, "dequantize": 0})
    QuantLinear.reset_fp8_paths()
    assert QuantLinear.fp8_path_record() == {"scaled_mm": 0, "dequantize": 0, "path": "none"}
    q = fp8_layer(activation)
    x = torch.ones(3, 32, dtype=torch.bfloat16)
    q(x)
    q(x)
    int8 = QuantLinear(32, 16, False, "int8", dtype=torch.bfloat16)
    int8.load_state_dict({"weight": torch.ones(16, 32, dtype=torch.int8),
                          "weight_scale": torch.ones(16, dtype=torch.bfloat16)})
    int8(x)  # not an E4M3 layer: not counted
    assert QuantLinear.fp8_path_record() == {"scaled_mm": 0, "dequantize": 2, "path": "dequantize"}
    QuantLinear.fp8_paths["scaled_mm"] = 1
    assert QuantLinear.fp8_path_record()["path"] == "both"


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp8_layers_record_the_scaled_mm_path(monkeypatch):
    """Needs: a CUDA GPU. A bf16 E4M3 layer on it records torch._scaled_mm where the probe
    finds it, else the dequantize fallback."""
    from bitdance_rt.models.quant import scaled_mm_available

    monkeypatch.setattr(QuantLinear, "fp8_paths", {"scaled_mm": 0, "dequantize": 0})
    q = fp8_layer().cuda()
    q(torch.ones(16, 32, dtype=torch.bfloat16, device="cuda"))
    want = "scaled_mm" if scaled_mm_available(torch.device("cuda")) else "dequantize"
    assert QuantLinear.fp8_path_record()["path"] == want


# -- fake TensorRT modules (the API surface the toolkit reads; no engine is built with them) -----


def fake_trt(name, version, layers=(), caps=None):
    module = types.ModuleType(name)
    module.__version__ = version
    module.Builder = object
    module.LayerType = enum.Enum("LayerType", ["CONVOLUTION", "MATRIX_MULTIPLY", *layers])
    if "ATTENTION_OUTPUT" in layers:
        module.IAttentionBoundaryLayer = type("IAttentionBoundaryLayer", (FakeLayer,), {})
    if caps is not None:
        module.ComputeCapability = enum.Enum("ComputeCapability", ["NONE", "CURRENT", *caps])
    return module


class FakeLayer:
    def __init__(self, kind):
        self.type = kind
        self.attention = types.SimpleNamespace(decomposable=False)


class FakeNetwork:
    def __init__(self, layers):
        self.layers = layers
        self.num_layers = len(layers)

    def get_layer(self, i):
        return self.layers[i]


RTX_CAPS = ["SM75", "SM80", "SM86", "SM89", "SM120", "SM121"]


@pytest.fixture
def fake_flavors(monkeypatch):
    """Installs fake ``tensorrt``/``tensorrt_rtx`` modules: ``install(name, module)``."""
    def install(name, module):
        monkeypatch.setitem(sys.modules, name, module)
        return trt_compat.load(name)
    return install


# -- 3. TensorRT older than 10.14/10.15: no attention layers ------------------------------------


@pytest.mark.parametrize("version,layers", [("10.13.3", ()),
                                             ("10.14.1", ("ATTENTION_OUTPUT",))])
def test_old_tensorrt_builds_standard_graphs_and_refuses_native_in_one_line(
        version, layers, fake_flavors, monkeypatch):
    fl = fake_flavors("tensorrt", fake_trt("tensorrt", version, layers))
    monkeypatch.setattr(trt_compat, "gpu_target", lambda device=None: "sm90")
    for attention in ("standard", "plugin"):
        assert build.check_build_settings(attention=attention, dtype="bf16") is not None
    network = FakeNetwork([FakeLayer(fl.trt.LayerType.MATRIX_MULTIPLY)])
    assert build._decomposable_attention(fl.trt, network) == 0  # no AttributeError
    with pytest.raises(trt_compat.TensorRTError) as e:
        build.check_build_settings(attention="native", dtype="bf16")
    msg = one_line(e)
    assert "need TensorRT >= 10.15" in msg and f"this is TensorRT {version}" in msg
    assert "pip install -U 'tensorrt>=10.15'" in msg and "--attention standard" in msg


def test_tensorrt_with_attention_layers_builds_native_and_makes_them_decomposable(
        fake_flavors, monkeypatch):
    fl = fake_flavors("tensorrt", fake_trt("tensorrt", "10.15.1",
                                           ("ATTENTION_OUTPUT", "KV_CACHE_UPDATE")))
    monkeypatch.setattr(trt_compat, "gpu_target", lambda device=None: "sm90")
    assert fl.native_attention() is None
    build.check_build_settings(attention="native", dtype="bf16")
    kinds = fl.trt.LayerType
    layers = [FakeLayer(kinds.ATTENTION_OUTPUT), FakeLayer(kinds.CONVOLUTION),
              FakeLayer(kinds.ATTENTION_OUTPUT)]
    assert build._decomposable_attention(fl.trt, FakeNetwork(layers)) == 2
    assert [x.attention.decomposable for x in layers] == [True, False, True]
    assert isinstance(layers[0], fl.trt.IAttentionBoundaryLayer)


def test_installed_tensorrt_rtx_has_the_native_layers():
    try:
        import tensorrt_rtx
    except ImportError:
        pytest.skip("tensorrt_rtx is not installed")
    assert trt_compat.Flavor("tensorrt_rtx", tensorrt_rtx).native_attention() is None
    targets = trt_compat.Flavor("tensorrt_rtx", tensorrt_rtx).targets()
    assert "sm89" in targets and "sm90" not in targets and "sm100" not in targets


# -- 4. TensorRT-RTX on a GPU it has no target for -----------------------------------------------


@pytest.fixture
def rtx(fake_flavors):
    return fake_flavors("tensorrt_rtx", fake_trt("tensorrt_rtx", "1.7.1",
                                                 ("ATTENTION_OUTPUT", "KV_CACHE_UPDATE"),
                                                 RTX_CAPS))


def test_rtx_build_on_a_hopper_host_is_refused_with_advice_that_works(rtx, monkeypatch):
    monkeypatch.setattr(trt_compat, "gpu_target", lambda device=None: "sm90")
    assert rtx.targets() == ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
    with pytest.raises(trt_compat.TensorRTError) as e:
        build.check_build_settings(attention="native", dtype="bf16", flavor="tensorrt_rtx")
    msg = one_line(e)
    assert "GPU is sm90 (Hopper: H100/H200)" in msg and "pip install tensorrt" in msg
    assert "--trt tensorrt" in msg and "sm90" not in msg.split("GPU is sm90")[1]
    # engines for another GPU (ahead of time) are still built on it
    build.check_build_settings(attention="native", dtype="bf16", flavor="tensorrt_rtx",
                               target="sm89")
    with pytest.raises(trt_compat.TensorRTError, match="cannot build for sm90.*--trt tensorrt"):
        build.check_build_settings(attention="native", dtype="bf16", flavor="tensorrt_rtx",
                                   target="sm90")
    monkeypatch.setattr(trt_compat, "gpu_target", lambda device=None: "sm89")
    build.check_build_settings(attention="native", dtype="bf16", flavor="tensorrt_rtx")
    monkeypatch.setattr(trt_compat, "gpu_target", lambda device=None: None)  # no GPU: AOT
    build.check_build_settings(attention="native", dtype="bf16", flavor="tensorrt_rtx")


def test_rtx_runtime_never_suggests_a_target_it_refuses(rtx):
    info = {"flavor": "tensorrt_rtx", "version": "1.7.1",
            "targets": list(trt_compat.RTX_DEFAULT_TARGETS)}
    with pytest.raises(EngineError) as e:
        trb.check_runtime(info, rtx, "sm90", "/x/engines")
    msg = one_line(e)
    assert "install datacenter TensorRT" in msg and "--trt tensorrt" in msg
    assert "--target" not in msg
    with pytest.raises(EngineError) as e:  # sm75: a target, but not in the portable default
        trb.check_runtime(info, rtx, "sm75", "/x/engines")
    assert one_line(e).endswith("with --target sm75")
    with pytest.raises(EngineError, match=r"--target sm89 \(or auto\)$"):
        trb.check_runtime({**info, "targets": ["sm86"]}, rtx, "sm89", "/x/engines")
    trb.check_runtime(info, rtx, "sm89", "/x/engines")
    # engines of another version on a GPU this flavor cannot run: the flavor is the problem
    with pytest.raises(EngineError) as e:
        trb.check_runtime({**info, "version": "1.6.0"}, rtx, "sm90", "/x/engines",
                          device_checked=False)
    assert "install datacenter TensorRT" in one_line(e) and "1.6.0" not in one_line(e)
    with pytest.raises(EngineError) as e:  # a GPU the flavor has but the engines lack
        trb.check_runtime({**info, "version": "1.6.0"}, rtx, "sm75", "/x/engines")
    assert "install TensorRT-RTX 1.6.0" not in one_line(e) and "rebuild them" in one_line(e)
    with pytest.raises(EngineError, match="install TensorRT-RTX 1.6.0 or rebuild"):
        trb.check_runtime({**info, "version": "1.6.0"}, rtx, None, "/x/engines",
                          device_checked=False)


def test_host_refusal_for_old_gpus_and_datacenter_tensorrt(fake_flavors, rtx):
    assert "older than any TensorRT engine target" in trt_compat.host_refusal(rtx, "sm70")
    dc = fake_flavors("tensorrt", fake_trt("tensorrt", "10.15.1"))
    assert dc.targets() is None and trt_compat.host_refusal(dc, "sm90") is None
    assert trt_compat.host_refusal(rtx, None) is None


# -- 5. the stream engines are enqueued on -------------------------------------------------------


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def test_engine_stream_leaves_the_default_stream_and_keeps_the_order():
    log = []
    default, own, side = (FakeStream(n, log) for n in ("default", "own", "side"))

    @contextlib.contextmanager
    def enter(stream):
        log.append(f"enter {stream.name}")
        yield
        log.append(f"leave {stream.name}")

    with trb.engine_stream(default, default, own, enter) as s:
        log.append(f"enqueue on {s.name}")
    assert log == ["own waits default", "enter own", "enqueue on own", "leave own",
                   "default waits own"]
    log.clear()
    with pytest.raises(RuntimeError):
        with trb.engine_stream(default, default, own, enter):
            raise RuntimeError("engine failed")
    assert log[-1] == "default waits own"  # ordered even when the enqueue fails
    log.clear()
    with trb.engine_stream(side, default, own, enter) as s:  # a capture's or a caller's stream
        log.append(f"enqueue on {s.name}")
    assert log == ["enqueue on side"]


@pytest.mark.gpu
@needs_cuda
def test_engine_stream_orders_real_cuda_streams():
    """Needs: a CUDA GPU. Work on the default stream, a stand-in engine (a copy) on the
    backend's stream, then work on the default stream again: each sees the one before, with
    a long kernel in front to expose a missing wait."""
    dev = torch.device("cuda")
    own = torch.cuda.Stream(dev)
    a = torch.zeros(1 << 20, device=dev)
    b = torch.empty_like(a)
    torch.cuda._sleep(50_000_000)
    a.fill_(3.0)
    with trb.engine_stream(torch.cuda.current_stream(dev), torch.cuda.default_stream(dev), own,
                           torch.cuda.stream) as s:
        assert s == own and torch.cuda.current_stream(dev) == own
        torch.cuda._sleep(50_000_000)
        b.copy_(a)
    c = b + 1
    assert torch.equal(c, torch.full_like(a, 4.0))


# -- 6. shapes and addresses a TensorRT context refuses -------------------------------------------


class FakeContext:
    def __init__(self, shape_ok=True, address_ok=True):
        self.shape_ok, self.address_ok, self.calls = shape_ok, address_ok, []

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))
        return self.shape_ok

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name))
        return self.address_ok


def test_bind_raises_one_line_naming_the_tensor_and_shape():
    x, y = torch.zeros(2, 51, 8), torch.zeros(2, 8)
    ctx = FakeContext()
    keep, back = trb.bind(ctx, "head_prepare", {"times": x}, {"ada_mod": y})
    assert ("shape", "times", (2, 51, 8)) in ctx.calls and ("address", "ada_mod") in ctx.calls
    with pytest.raises(EngineError) as e:
        trb.bind(FakeContext(shape_ok=False), "head_prepare", {"times": x}, {"ada_mod": y})
    msg = one_line(e)
    assert "head_prepare" in msg and "input times" in msg and "[2, 51, 8]" in msg
    with pytest.raises(EngineError) as e:
        trb.bind(FakeContext(address_ok=False), "decoder", {"latent": x}, {"image": y})
    assert "input latent" in one_line(e) and "[2, 51, 8]" in one_line(e)

    class OutputRefused(FakeContext):
        def set_tensor_address(self, name, address):
            return name != "image"

    with pytest.raises(EngineError) as e:
        trb.bind(OutputRefused(), "decoder", {"latent": x}, {"image": y})
    assert "output image" in one_line(e) and "[2, 8]" in one_line(e)


def test_bind_refuses_a_shape_change_inside_one_capture():
    pinned = {}
    trb.bind(FakeContext(), "head_prepare", {"times": torch.zeros(51)}, {}, pinned)
    trb.bind(FakeContext(), "head_prepare", {"times": torch.zeros(51)}, {}, pinned)
    with pytest.raises(EngineError) as e:
        trb.bind(FakeContext(), "head_prepare", {"times": torch.zeros(50)}, {}, pinned)
    assert "changes shape from [51] to [50] inside one captured CUDA graph" in one_line(e)
    trb.bind(FakeContext(), "head_prepare", {"times": torch.zeros(50)}, {})  # eager: fine


# -- 7. graphs captured on the backend's device ---------------------------------------------------


def test_torch_backend_captures_on_its_device(tiny_ckpt, monkeypatch):
    """Both graphs of the torch backend (the CPU stand-ins here) are given its device."""
    from bitdance_rt.checkpoint import load_checkpoint
    from bitdance_rt.request import GenerationRequest, ImagePlan, plan_for
    from bitdance_rt.runtime import generate_tokens
    from bitdance_rt.runtime.backends import torch_backend

    devices, real = [], graphs.capture

    def recording(fn, emulate=False, device=None):
        devices.append(device)
        return real(fn, emulate=emulate, device=device)

    monkeypatch.setattr(graphs, "capture", recording)
    model = load_checkpoint(tiny_ckpt)
    full = plan_for(model, GenerationRequest("a kite", 256, 896, steps=1, guidance=1.0, seed=1))
    plan = ImagePlan(h=4, w=4, cond_ids=full.cond_ids, uncond_ids=None, steps=1, guidance=1.0)
    be = torch_backend.TorchBackend(model, emulate_graphs=True)
    generate_tokens(be, plan, 1)
    assert devices == [be.device, be.device]


def test_tensorrt_graphs_capture_on_the_backends_device(monkeypatch):
    devices = []
    monkeypatch.setattr(graphs, "capture", lambda fn, emulate=False, device=None:
                        devices.append(device) or types.SimpleNamespace(out=None))
    dev = torch.device("cpu")
    be = types.SimpleNamespace(device=dev, _one_shape_per_input=contextlib.nullcontext, meter=None,
                               cache_k=torch.zeros(1, 2, 1, 8, 4), parallel_num=4,
                               pe_blocks=torch.zeros(3, 4, 8),
                               spec=types.SimpleNamespace(llm=types.SimpleNamespace(
                                   hidden_size=16)))
    trb.HeadLoopGraph(be, torch.zeros(2, 4, 16), [torch.zeros(1, 4, 32)] * 3)
    trb.BlockStepGraph(be, torch.zeros(1, 4, 32), 0)
    assert devices == [dev, dev]


def test_recorded_graph_takes_the_device():
    x = torch.ones(3)
    g = graphs.capture(lambda: x * 2, emulate=True, device="cpu")
    x.fill_(5)
    g.replay()
    assert g.device == torch.device("cpu") and torch.equal(g.out, torch.full((3,), 10.0))


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_captures_and_replays_on_the_device_it_is_given():
    """Needs: a CUDA GPU (two for the cross-device half). A graph made for the last device
    while device 0 is current captures there, and replays there whatever is current."""
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.ones(4, device=last)
    with torch.cuda.device(0):
        g = graphs.capture(lambda: x * 3, device=last)
        x.fill_(2)
        g.replay()
        torch.cuda.synchronize(last)
    assert g.out.device == last and torch.equal(g.out.cpu(), torch.full((4,), 6.0))
    assert graphs.cuda_device("cuda").index == torch.cuda.current_device()


# -- 8. head_prepare slices of one size -----------------------------------------------------------


class SlicedHead(GraphRuntime):
    """A GraphRuntime with only what _prepare_head touches: each head_prepare call is bound
    to a fake TensorRT context under one capture's shape check, and writes 10 * time + row."""

    def __init__(self, steps, per_call):
        self.max_steps_per_call = per_call
        self.times = torch.linspace(1, 0, steps + 1)
        self.ada_mod = torch.full((steps + 1, 2, 3), -1.0)
        self.final_mod = torch.full((steps + 1, 2, 2), -1.0)
        self.sizes, self.pinned = [], {}

    def _run(self, name, inputs, outputs):
        trb.bind(FakeContext(), name, inputs, outputs, self.pinned)
        self.sizes.append(inputs["times"].shape[0])
        t = inputs["times"][:, None, None]
        rows = inputs["cond"][None, :, :1]
        outputs["ada_mod"].copy_((10 * t + rows).expand_as(outputs["ada_mod"]))
        outputs["final_mod"].copy_((10 * t + rows).expand_as(outputs["final_mod"]))


@pytest.mark.parametrize("steps", [1, 25, 49, 50, 51, 100, 101, 150, 152, 250])
def test_head_prepare_slices_have_one_shape_and_cover_every_step(steps):
    rt = SlicedHead(steps, 51)
    cond = torch.tensor([[0.0], [1.0]])
    rt._prepare_head(cond)  # raises if a shape changed (one capture's check)
    n = steps + 1
    assert set(rt.sizes) == {min(n, 51)} and len(rt.sizes) == -(-n // 51)
    want = 10 * rt.times[:, None, None] + cond[None, :, :1]
    assert torch.equal(rt.ada_mod, want.expand_as(rt.ada_mod))
    assert torch.equal(rt.final_mod, want.expand_as(rt.final_mod))
