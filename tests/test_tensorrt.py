"""TensorRT: native KV-cache attention graphs, engines built from exports, engines.json and
everything the runtime refuses; the TensorRT backend's GPU tests.

TensorRT-RTX (``pip install tensorrt-rtx-cu12``, installed by the test extra) builds engines
without a GPU, so every build here is real. Running an engine needs a CUDA GPU that one of the
engine's targets covers: those tests are marked ``gpu`` and ``trt`` and skip without one.

The default suite builds engines from the session's shared standard export (a copy of it:
`bitdance-export build`, seconds) for everything about engines.json and what build and the
runtime refuse, and exports the native block step alone to run it in ONNX Runtime. The slow
tests add the one-shot export with engines (``--engines``: native graphs, then engines), the
whole native export through ONNX Runtime and `check`, every form (P = 4 and 16, standard and
native, fp32, fp16 and bf16), the image-level agreement at the sizes of the acceptance, and the
full-width 14B. Random inputs come from the fixed seeds of a ``seed`` parameter, named in the
assertion messages (and by conftest's report of a failure).
"""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt import trt as trt_compat
from bitdance_rt.checkpoint import load_checkpoint
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import EngineError
from bitdance_rt.export.check import check_export
from bitdance_rt.export.native import NativeKV, PromptKV, tensor_scatter, with_prefix
from bitdance_rt.manifest import GRAPHS, sha256_file
from bitdance_rt.attention.plain import attend, write_kv_ref
from bitdance_rt.request import GenerationRequest, ImagePlan, plan_for
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from bitdance_rt.runtime.backends.torch_backend import TorchBackend

TRT_OK, TRT_WHY = trt_compat.available()
if TRT_OK:  # a GPU the installed flavor has no target for (TensorRT-RTX on an H100) refuses builds
    _refused = trt_compat.host_refusal(trt_compat.load(), trt_compat.gpu_target())
    TRT_OK, TRT_WHY = (False, _refused) if _refused else (TRT_OK, TRT_WHY)
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT or TensorRT-RTX: {TRT_WHY}")
MAX_SEQ = 1152  # P = 4 at 512x512 (1024 tokens) with a short prompt


def fitting_ckpt(ckpt, dst, max_seq=MAX_SEQ):
    """A copy of ``ckpt`` (the same weights and shapes) that declares only the sizes whose
    tokens and a short prompt fit ``max_seq`` KV slots: the exporter refuses a --max-seq below
    the largest declared size's need."""
    from bitdance_rt.request import shortest_context

    shutil.copytree(ckpt, dst)
    model = load_checkpoint(dst, weights=False)
    sizes = [list(s) for s in model.spec.info.sizes
             if shortest_context(model.spec, model.tokenizer, [s]) + 64 <= max_seq]
    (dst / "bitdance_rt.json").write_text(json.dumps({"sizes": sizes}))
    return dst


def identical_fraction(a, b):
    return (a == b).all(-1).float().mean().item()


def run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the native form in PyTorch: the same contract as attention/plain.attend ----------------


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("mode", ["block", "causal"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_native_attention_is_the_reference_contract(mode, hq, hkv, seed):
    """Cache write (TensorScatter) + masked attention over the whole static cache gives the
    attention of attend() (separate scores for cache and new tokens, nothing written) and the
    cache write_kv_ref() makes. Unused slots hold finite garbage, as a reused buffer does."""
    gen = torch.Generator().manual_seed(seed * 100 + hq * 10 + hkv + (mode == "causal"))
    s, t, d, slots = 3, 5, 16, 23
    lens = torch.tensor([0, 7, 18])
    q = torch.randn(s, hq, t, d, generator=gen)
    k, v = (torch.randn(s, hkv, t, d, generator=gen) for _ in range(2))
    kc, vc = (torch.randn(s, hkv, slots, d, generator=gen) * 3 for _ in range(2))
    kv = NativeKV([kc], [vc], lens)
    out = kv.attend(0, q, k, v, mode)
    want = attend(q, k, v, kc, vc, lens, mode)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"seed {seed}: {m}")
    k_ref, v_ref = kc.clone(), vc.clone()
    write_kv_ref(k, v, k_ref, v_ref, lens)
    assert torch.equal(kv.k_out[0], k_ref) and torch.equal(kv.v_out[0], v_ref), f"seed {seed}"
    assert torch.equal(tensor_scatter(kc, k, lens), k_ref), f"seed {seed}"


@pytest.mark.parametrize("seed", [7])
def test_native_prefill_writes_prompt_and_block_once(seed):
    """The prefill form: a causal prompt pass over its own keys (zeroed past each row's
    length), then the image-start block attending to the prompt and itself; both written into
    the cache by one TensorScatter per layer (TensorRT's cache update must read the graph's
    input). Same outputs and the same cache as attend() over a cache holding the prompt."""
    gen = torch.Generator().manual_seed(seed)
    said = lambda m: f"seed {seed}: {m}"  # noqa: E731
    h, d, t, p, slots = 2, 8, 6, 4, 16
    lens = torch.tensor([6, 3])
    q, k, v = (torch.randn(2, h, t, d, generator=gen) for _ in range(3))
    prompt = PromptKV(lens)
    out = prompt.attend(0, q, k, v, "causal")
    for r, n in enumerate(lens.tolist()):  # the real tokens see only real tokens
        want = attend(q[r:r + 1, :, :n], k[r:r + 1, :, :n], v[r:r + 1, :, :n], None, None,
                      None, "causal")
        torch.testing.assert_close(out[r:r + 1, :, :n], want, rtol=1e-5, atol=1e-6, msg=said)
    bq, bk, bv = (torch.randn(2, h, p, d, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(2, h, slots, d, generator=gen) for _ in range(2))
    block = NativeKV([kc], [vc], lens, prefix=prompt)
    got = block.attend(0, bq, bk, bv, "block")
    cache_k, cache_v = torch.zeros_like(kc), torch.zeros_like(vc)
    cache_k[:, :, :t], cache_v[:, :, :t] = prompt.keys[0], prompt.values[0]
    torch.testing.assert_close(got, attend(bq, bk, bv, cache_k, cache_v, lens, "block"),
                               rtol=1e-5, atol=1e-5, msg=said)
    write_kv_ref(bk, bv, cache_k, cache_v, lens)
    want_k = kc.clone()
    want_k[:, :, :t + p] = cache_k[:, :, :t + p]
    assert torch.equal(block.k_out[0], want_k), said("cache")
    merged = with_prefix(prompt.keys[0], bk, lens)
    assert torch.equal(merged[1, :, :3], k[1, :, :3]) and torch.equal(merged[1, :, 3:7], bk[1])
    assert not merged[1, :, 7:].any(), said("merged")


# -- one export with engines --------------------------------------------------------------------


@pytest.fixture(scope="module")
def native4(tiny_ckpt, tmp_path_factory):
    """``bitdance-export --engines``: native fp32 graphs of the tiny P = 4 model, then their
    engines in OUT/engines, in one command."""
    if not TRT_OK:
        pytest.skip(f"needs TensorRT or TensorRT-RTX: {TRT_WHY}")
    out = tmp_path_factory.mktemp("native4") / "export"
    ckpt = fitting_ckpt(tiny_ckpt, out.parent / "ckpt")
    r = run(export_app, "--checkpoint", ckpt, "--out", out, "--engines", "--max-seq", MAX_SEQ)
    assert r.exit_code == 0, r.output
    for name in GRAPHS:
        assert f"] {name}: {name}.onnx" in r.output and f"] {name}: {name}.engine" in r.output
    return out


@pytest.fixture(scope="module")
def native4_graphs(tiny_ckpt, tmp_path_factory, request):
    """The native fp32 graphs of the tiny P = 4 model for ONNX Runtime: ``native4``'s when
    TensorRT is here (the same export), else the same export without engines (exporting
    ``--attention native`` needs no TensorRT)."""
    if TRT_OK:
        return request.getfixturevalue("native4")
    out = tmp_path_factory.mktemp("native4_graphs") / "export"
    ckpt = fitting_ckpt(tiny_ckpt, out.parent / "ckpt")
    r = run(export_app, "--checkpoint", ckpt, "--out", out, "--attention", "native",
            "--max-seq", MAX_SEQ)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def engines4(tiny_export, tmp_path_factory):
    """A copy of the session's standard export with its engines (`bitdance-export build`)."""
    if not TRT_OK:
        pytest.skip(f"needs TensorRT or TensorRT-RTX: {TRT_WHY}")
    out = tmp_path_factory.mktemp("engines4") / "export"
    shutil.copytree(tiny_export, out)
    r = run(export_app, "build", out)
    assert r.exit_code == 0, r.output
    for name in GRAPHS:
        assert f"] {name}: {name}.engine" in r.output
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def copy_of(d, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(d, dst)
    return dst


def check_engines_json(d):
    """engines.json of ``d/engines`` records what was built: the flavor and targets, the export
    (its manifest and ONNX hashes), every engine's file, size and hash, and the profiles the
    manifest's limits ask for."""
    m = json.loads((d / "manifest.json").read_text())
    e = d / "engines"
    info = json.loads((e / "engines.json").read_text())
    flavor = trt_compat.load()
    assert info["flavor"] == flavor.name and info["version"] == flavor.version
    if flavor.rtx:
        assert info["targets"] == list(trt_compat.RTX_DEFAULT_TARGETS)
    assert info["attention"] == m["attention"] and info["dtype"] == "fp32"
    assert info["cache_slots"] == m.get("cache_slots")
    assert info["export"]["dir"] == ".."
    assert info["export"]["manifest_sha256"] == sha256_file(d / "manifest.json")
    assert (e / "manifest.json").read_bytes() == (d / "manifest.json").read_bytes()
    assert info["export"]["onnx_sha256"] == {f"{n}.onnx": sha256_file(d / f"{n}.onnx")
                                              for n in GRAPHS}
    for name in GRAPHS:
        entry = info["engines"][name]
        assert entry["sha256"] == sha256_file(e / entry["file"])
        assert entry["bytes"] == (e / entry["file"]).stat().st_size and entry["build_s"] > 0
    seq, rows = m["limits"]["max_seq"], m["limits"]["max_rows"]
    prof = info["engines"]["block_step"]["profile"]
    if m["attention"] == "native":
        assert prof["k_cache_0"] == {"min": [1, 2, seq, 32], "opt": [2, 2, seq, 32],
                                     "max": [rows, 2, seq, 32]}
    else:  # (layers, rows, kv heads, positions, head dim)
        assert prof["k_cache"]["min"] == [2, 1, 2, 1, 32]
        assert prof["k_cache"]["max"] == [2, rows, 2, seq, 32]
    assert prof["tokens"]["max"] == [m["limits"]["max_batch"], 4, 32]
    dec = info["engines"]["decoder"]["profile"]["latent"]
    hs, ws = [h // 16 for h, _ in m["sizes"]], [w // 16 for _, w in m["sizes"]]
    assert dec == {"min": [1, 32, min(hs), min(ws)], "opt": [1, 32, 64, 64],
                   "max": [m["limits"]["max_batch"], 32, max(hs), max(ws)]}
    assert info["engines"]["head_prepare"]["profile"]["times"]["max"] == [51]
    assert info["engines"]["prefill"]["profile"]["input_ids"]["max"] == [rows, seq - 4]
    return m


@needs_trt
def test_engines_json_records_what_was_built(engines4):
    m = check_engines_json(engines4)
    assert m["attention"] == "standard" and m.get("cache_slots") is None


@needs_trt
@pytest.mark.slow
def test_one_shot_native_export_with_engines(native4):
    """``bitdance-export --engines``: native graphs (opset 24, a static cache of --max-seq
    slots) and their engines, in one command."""
    m = check_engines_json(native4)
    assert m["attention"] == "native" and m["opset"] == 24 and m["cache_slots"] == MAX_SEQ
    hs, ws = [h // 16 for h, _ in m["sizes"]], [w // 16 for _, w in m["sizes"]]
    assert max(hs) == max(ws) == 64  # 1024x256 and 256x1024 (1024 tokens) fit MAX_SEQ


@pytest.mark.parametrize("seed", [5])
def test_native_block_step_runs_in_onnxruntime(tiny_ckpt, tmp_path, seed):
    """The native block step alone (its static caches, written in place by TensorScatter):
    exported as the exporter does and run in ONNX Runtime, it gives the outputs of the module it
    was exported from, on the module's example inputs with random cache contents and lengths
    (the whole native export, `check` and images: -m slow)."""
    import onnxruntime as ort

    from bitdance_rt.export.attention import attention_opset, attention_translations
    from bitdance_rt.export.common import OPSET, export_onnx
    from bitdance_rt.export.exporter import graph_defs

    model = load_checkpoint(tiny_ckpt)
    gdef = graph_defs(model, "native", 64)["block_step"]()
    files = export_onnx(gdef, tmp_path, attention_opset("native", OPSET),
                        attention_translations("native"))
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for name, t in gdef.example.items():
        if t.is_floating_point():
            feeds[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        else:  # lengths: rows at different places in the cache
            feeds[name] = torch.randint(1, 40, t.shape, generator=gen, dtype=t.dtype)
    with torch.no_grad():
        want = gdef.module(*[v.clone() for v in feeds.values()])
    want = want if isinstance(want, (tuple, list)) else (want,)
    sess = ort.InferenceSession(str(tmp_path / files[0]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    assert [o.name for o in sess.get_outputs()] == list(gdef.outputs)
    assert len(got) == len(want)
    for name, g, w in zip(gdef.outputs, got, want):
        w = w.float()
        err = (torch.from_numpy(g).float() - w).abs().max().item()
        assert err <= 1e-4 * max(1.0, w.abs().max().item()), f"seed {seed}: {name} {err}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4])
def test_native_graphs_pass_check(native4_graphs, seed):
    rows, _ = check_export(native4_graphs, seed=seed)
    assert {r.graph for r in rows} == set(GRAPHS)
    assert all(r.passed for r in rows), (f"seed {seed}", [r for r in rows if not r.passed])
    caches = [r for r in rows if "cache_out" in r.output]
    assert len(caches) == 3 * 4 and max(r.scaled_rel for r in caches) < 1e-5, f"seed {seed}"
    r = run(export_app, "check", native4_graphs, "--seed", seed + 1)
    assert r.exit_code == 0 and "23/23 outputs within tolerance" in r.output, \
        f"seed {seed + 1}: {r.output}"


def small_plan(model, guidance, images=1, h=4, w=8):
    """A whole AR run (prefill, every block, decode) on a latent smaller than any released
    size: the loop and every graph, in seconds."""
    full = plan_for(model, GenerationRequest("a red kite over the dunes", 256, 896, steps=2,
                                             guidance=guidance, seed=1, num_images=images))
    return ImagePlan(h=h, w=w, cond_ids=full.cond_ids, uncond_ids=full.uncond_ids, steps=2,
                     guidance=guidance)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_native_onnxruntime_matches_torch(native4_graphs, tiny_model, tiny_ckpt, seed):
    """The native graphs in ONNX Runtime (caches bound in place) give the torch backend's
    image; with and without guidance, the backend's buffers reused."""
    be = OnnxRuntimeBackend(load_checkpoint(tiny_ckpt, weights=False), native4_graphs)
    for guidance, images in ((3.0, 1), (1.0, 2)):
        plan = small_plan(tiny_model, guidance, images)
        ours = generate(be, plan, seed)
        want = generate(TorchBackend(tiny_model), plan, seed)
        assert ours.shape == want.shape == (images, 64, 128, 3)
        assert identical_fraction(ours, want) >= 0.999, f"seed {seed}, guidance {guidance}"
    # the cache was written in place by the graphs: the rows hold the prompt and the blocks
    n = len(plan.cond_ids[0]) + plan.tokens - 4
    assert be.lens_host == [n, n] and be.cache_k[:, :, :, :n].abs().amax(-1).min() > 0
    assert not be.cache_k[:, :, :, n:].any()


@pytest.mark.parametrize("seed", [12])
def test_head_prepare_in_slices_of_one_size_matches_one_call(tiny_export, tiny_ckpt, seed):
    """An engine that takes fewer step times per head_prepare call than N + 1 gets slices of
    one size (the last overlapping the one before): the same tokens as one call (ONNX Runtime
    here, whose graph takes any number)."""
    from bitdance_rt.runtime import generate_tokens

    spec_only = load_checkpoint(tiny_ckpt, weights=False)
    plan = small_plan(spec_only, 3.0, h=4, w=4)  # N = 2: 3 step times
    whole = generate_tokens(OnnxRuntimeBackend(spec_only, tiny_export), plan, seed)
    sliced_be = OnnxRuntimeBackend(spec_only, tiny_export)
    sliced_be.max_steps_per_call = 2
    sizes, run_graph = [], sliced_be._run

    def counting(name, inputs, outputs):
        if name == "head_prepare":
            sizes.append(inputs["times"].shape[0])
        run_graph(name, inputs, outputs)

    sliced_be._run = counting
    sliced = generate_tokens(sliced_be, plan, seed)
    assert set(sizes) == {2} and len(sizes) == 2 * plan.tokens // 4, f"seed {seed}: {sizes}"
    assert torch.equal(sliced, whole), f"seed {seed}"


# -- what build and the runtime refuse ----------------------------------------------------------


def flip(path, at=None, n=4096):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def generate_trt(ckpt, engine_dir, tmp_path):
    return run(rt_app, "generate", "-c", ckpt, "-p", "x", "--height", "256", "--width", "896",
               "--backend", "tensorrt", "--engine-dir", engine_dir, "--no-progress", "--out",
               tmp_path / "x.png")


@needs_trt
def test_runtime_refuses_changed_files(engines4, tiny_ckpt, tmp_path):
    """A changed ONNX file, export manifest, engine file or engine-side manifest copy: exit 2
    before any CUDA work, naming the file and the fix; a clean copy gets as far as the GPU."""
    d = copy_of(engines4, tmp_path)
    if not torch.cuda.is_available():  # every check passes; then the device is refused
        r = generate_trt(tiny_ckpt, d, tmp_path)  # the export directory finds its engines/
        assert r.exit_code == 2 and "--backend tensorrt runs on a CUDA GPU" in r.output

    flip(d / "head_step.onnx")
    r = generate_trt(tiny_ckpt, d / "engines", tmp_path)
    assert r.exit_code == 2 and "head_step.onnx has changed since it was written" in r.output
    assert "re-run `bitdance-export` into" in r.output and "rebuild the engines" in r.output
    r = run(export_app, "build", d)
    assert r.exit_code == 2 and "head_step.onnx has changed" in r.output
    shutil.copy(engines4 / "head_step.onnx", d / "head_step.onnx")

    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "created": "later"}))
    r = generate_trt(tiny_ckpt, d, tmp_path)
    assert r.exit_code == 2 and "built from an earlier export" in r.output
    assert f"bitdance-export build {d.resolve()}" in r.output
    shutil.copy(engines4 / "manifest.json", d / "manifest.json")

    flip(d / "engines" / "block_step.engine")
    r = generate_trt(tiny_ckpt, d, tmp_path)
    assert r.exit_code == 2 and "engine file" in r.output and "block_step.engine" in r.output
    assert "rebuild them with `bitdance-export build" in r.output
    shutil.copy(engines4 / "engines" / "block_step.engine", d / "engines" / "block_step.engine")

    (d / "engines" / "manifest.json").write_text("{}")
    r = generate_trt(tiny_ckpt, d, tmp_path)
    assert r.exit_code == 2 and "manifest copy" in r.output
    assert "Traceback" not in r.output


@needs_trt
def test_runtime_refuses_other_models_versions_and_gpus(engines4, tiny_ckpt, tiny16_ckpt,
                                                         tmp_path):
    from bitdance_rt.runtime.backends.tensorrt_backend import check_runtime
    from bitdance_rt.tiny import make_tiny

    r = generate_trt(tiny16_ckpt, engines4, tmp_path)
    assert r.exit_code == 2 and "exported from another model" in r.output
    other = make_tiny(tmp_path / "other", parallel_num=4, seed=9)
    r = generate_trt(other, engines4, tmp_path)
    assert r.exit_code == 2 and "other weights" in r.output
    d = copy_of(engines4, tmp_path)
    info = json.loads((d / "engines" / "engines.json").read_text())
    (d / "engines" / "engines.json").write_text(json.dumps({**info, "version": "0.9.0"}))
    r = generate_trt(tiny_ckpt, d, tmp_path)
    assert r.exit_code == 2 and "were built by" in r.output and "0.9.0" in r.output
    assert "engines run only with the version that built them" in r.output
    flavor = trt_compat.load()
    if flavor.rtx:  # no Hopper target: the advice is datacenter TensorRT, never --target sm90
        with pytest.raises(EngineError) as e:
            check_runtime(info, flavor, "sm90", d)
        assert "install datacenter TensorRT" in str(e.value) and "--target" not in str(e.value)
        with pytest.raises(EngineError, match=r"built for sm80, .*not for this GPU \(sm75\).*"
                                              "--target sm75$"):
            check_runtime(info, flavor, "sm75", d)
    else:
        other = "sm86" if "sm86" not in info["targets"] else "sm89"
        with pytest.raises(EngineError, match=rf"not for this GPU \({other}\).*--target "
                                              rf"{other} \(or auto\)"):
            check_runtime(info, flavor, other, d)
    with pytest.raises(EngineError, match="none is visible"):
        check_runtime(info, flavor, None, d)
    check_runtime(info, flavor, info["targets"][0], d)  # the GPU it was built for: fine


@needs_trt
def test_build_refusals(engines4, tiny_ckpt, tmp_path):
    flavor = trt_compat.load()
    if flavor.rtx:
        r = run(export_app, "build", engines4, "--target", "sm90", "--out", tmp_path / "e")
        assert r.exit_code == 2 and "cannot build for sm90" in r.output
        assert "datacenter TensorRT" in r.output
        # --attention plugin: refused before the weights load
        r = run(export_app, "--checkpoint", tiny_ckpt, "--out", tmp_path / "p", "--engines",
                "--attention", "plugin")
        assert r.exit_code == 2 and "--attention plugin needs TensorRT plugin layers" in r.output
        assert "--attention native" in r.output and not (tmp_path / "p").exists()
    r = run(export_app, "build", engines4, "--target", "sm61")
    assert r.exit_code == 2 and "unknown --target" in r.output
    r = run(export_app, "build", engines4, "--opt-size", "100x100")
    assert r.exit_code == 2 and "--opt-size" in r.output
    r = run(export_app, "build", engines4, "--trt", "cuda")
    assert r.exit_code == 2 and "unknown TensorRT flavor" in r.output
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    r = run(export_app, "build", engines4, "--out", junk)
    assert r.exit_code == 2 and "holds no engines.json" in r.output
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]
    r = run(export_app, "build", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_missing_tensorrt_names_both_install_routes(monkeypatch):
    """Asking for a flavor that is not installed (here: datacenter TensorRT, which installs
    only from NVIDIA's index) names both install routes."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            __import__(name)
        except ImportError:
            with pytest.raises(trt_compat.TensorRTError) as e:
                trt_compat.load(name)
            msg = str(e.value)
            assert "pip install tensorrt-rtx-cu12" in msg and "pip install tensorrt," in msg
            monkeypatch.setenv(trt_compat.ENV, name)
            with pytest.raises(trt_compat.TensorRTError, match="is not importable"):
                trt_compat.load()
            monkeypatch.delenv(trt_compat.ENV)
    with pytest.raises(trt_compat.TensorRTError, match="unknown TensorRT flavor"):
        trt_compat.load("tensorrt-llm")


@needs_trt
def test_build_is_staged_and_targets(engines4, tmp_path, monkeypatch):
    """`build` into an existing engine directory that fails on the third engine leaves the
    previous engines as they were; an explicit target is recorded."""
    from bitdance_rt.export import build

    d = copy_of(engines4, tmp_path)
    e = d / "engines"
    before = {p.name: p.read_bytes() for p in e.iterdir()}
    real, calls = build.build_engine, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "build_engine", failing)
    r = run(export_app, "build", d)
    assert r.exit_code == 130 and len(calls) == 3
    assert {p.name: p.read_bytes() for p in e.iterdir()} == before
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".engines")) == []
    monkeypatch.setattr(build, "build_engine", real)
    if trt_compat.load().rtx:
        r = run(export_app, "build", d, "--out", tmp_path / "sm86", "--target", "sm86",
                "--timing-cache", tmp_path / "timing.cache", "--opt-size", "512x512",
                "--opt-batch", "2")
        assert r.exit_code == 0, r.output
        info = json.loads((tmp_path / "sm86" / "engines.json").read_text())
        assert info["targets"] == ["sm86"] and info["export"]["dir"] == str(d.resolve())
        assert "--timing-cache ignored" in r.output  # TensorRT-RTX has none
        assert info["engines"]["decoder"]["profile"]["latent"]["opt"] == [2, 32, 32, 32]


# -- slow: every form builds; image agreement at the acceptance sizes; the 14B -----------------


@needs_trt
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("attention", ["standard", "native"])
@pytest.mark.parametrize("p", [4, 16])
def test_engines_build_for_every_form(p, attention, dtype, tiny_ckpt, tiny16_ckpt, tmp_path):
    from bitdance_rt.export import export_checkpoint
    from bitdance_rt.export.build import build_engines

    lines = []
    ckpt = fitting_ckpt(tiny_ckpt if p == 4 else tiny16_ckpt, tmp_path / "ckpt", 1280)
    export_checkpoint(ckpt, tmp_path / "e", dtype=dtype, attention=attention, max_seq=1280,
                      progress=lines.append)
    info = build_engines(tmp_path / "e", progress=lines.append)
    print("\n".join(lines))
    assert set(info["engines"]) == set(GRAPHS) and info["dtype"] == dtype
    assert all((tmp_path / "e" / "engines" / e["file"]).stat().st_size == e["bytes"]
               for e in info["engines"].values())


def cli_image(ckpt, engine_dir, backend, req, path):
    import numpy as np
    from PIL import Image

    args = ["generate", "-c", ckpt, "-p", req.prompt, "--height", req.height, "--width",
            req.width, "--steps", req.steps, "--guidance", req.guidance, "--seed", req.seed,
            "--device", "cpu", "--backend", backend, "--no-progress", "--out", path]
    if engine_dir is not None:
        args += ["--engine-dir", engine_dir]
    r = run(rt_app, *args)
    assert r.exit_code == 0, r.output
    return torch.from_numpy(np.array(Image.open(path)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])
def test_native_p4_512x512_guided_matches_torch(native4_graphs, tiny_ckpt, tmp_path, seed):
    """N = 10: with fewer steps some x ends within 1e-6 of 0, where float32 rounding (1e-5
    between any two implementations) flips its sign and the rest of the image with it (seed
    3 at N = 4: block 47 of 256); at N = 10 the smallest |x| of this run is 1.4e-4."""
    req = GenerationRequest("a lighthouse at dusk", 512, 512, steps=10, guidance=3.0, seed=seed)
    ours = cli_image(tiny_ckpt, native4_graphs, "onnxruntime", req, tmp_path / "ort.png")
    want = cli_image(tiny_ckpt, None, "torch", req, tmp_path / "torch.png")
    same = identical_fraction(ours, want)
    print(f"P=4 512x512 guidance 3.0: {100 * same:.3f}% identical pixels")
    assert same >= 0.999, f"seed {seed}: {100 * same:.3f}% identical pixels"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])
def test_native_p16_256x1024_unguided_matches_torch(tiny16_ckpt, tmp_path, seed):
    from bitdance_rt.export import export_checkpoint

    ckpt = fitting_ckpt(tiny16_ckpt, tmp_path / "ckpt", 1280)
    export_checkpoint(ckpt, tmp_path / "e16", attention="native", max_seq=1280)
    r = run(export_app, "check", tmp_path / "e16", "--seed", "0")
    assert r.exit_code == 0, f"seed 0: {r.output}"
    req = GenerationRequest("a lighthouse at dusk", 256, 1024, steps=10, guidance=1.0, seed=seed)
    ours = cli_image(tiny16_ckpt, tmp_path / "e16", "onnxruntime", req, tmp_path / "ort.png")
    want = cli_image(tiny16_ckpt, None, "torch", req, tmp_path / "torch.png")
    same = identical_fraction(ours, want)
    print(f"P=16 256x1024 guidance 1.0: {100 * same:.3f}% identical pixels")
    assert same >= 0.999, f"seed {seed}: {100 * same:.3f}% identical pixels"


FULL_14B = r"""
import dataclasses, json, resource, sys, time
import torch
from bitdance_rt.export import export_model
from bitdance_rt.export.build import build_engines
from bitdance_rt.spec import preset
from bitdance_rt.tiny import random_model

out = sys.argv[1]
full = preset("14b")
spec = dataclasses.replace(full, llm=dataclasses.replace(full.llm, num_hidden_layers=2))
t0 = time.perf_counter()
model = random_model(spec, dtype=torch.bfloat16)
model.llm.lm_head = None
model.extras["full_spec"] = full
export_model(model, out, preset_name="14b-64x", attention="native", progress=print)
del model
t1 = time.perf_counter()
peak_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = build_engines(out, progress=print)
t2 = time.perf_counter()
print(json.dumps({"export_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1),
                  "peak_rss_gb_after_export": round(peak_export / 2**20, 2),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                       / 2**20, 2),
                  "engine_gb": round(sum(e["bytes"] for e in info["engines"].values()) / 1e9,
                                     2)}))
"""


@needs_trt
@pytest.mark.slow
def test_full_width_14b_two_layers_native_bf16_engines(tmp_path):
    """14b-64x shapes, random bf16 weights, LLM cut to 2 layers, --attention native: every
    graph exports and builds into an engine on the CPU (TensorRT-RTX). Run in a child process
    so its time and peak memory are its own (printed: pytest -s)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FULL_14B, str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=3 * 3600)
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert r.returncode == 0
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    info = json.loads((tmp_path / "e" / "engines" / "engines.json").read_text())
    assert set(info["engines"]) == set(GRAPHS) and info["dtype"] == "bf16"
    assert stats["engine_gb"] > 5


# -- the TensorRT backend on a GPU (cannot run on CPU-only machines) ----------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a CUDA GPU that the engines' targets cover "
                               "(TensorRT-RTX: sm80/86/89/120; datacenter TensorRT: any)")


@pytest.fixture(scope="module")
def gpu_engines(native4):
    """The module's engines, or ones built for this GPU when it is not among their targets."""
    info = json.loads((native4 / "engines" / "engines.json").read_text())
    gpu = trt_compat.gpu_target()
    if gpu not in info["targets"]:
        pytest.skip(f"the engines were built for {info['targets']}, this GPU is {gpu}")
    return native4


@pytest.mark.gpu
@pytest.mark.trt
@needs_trt
@needs_gpu
@pytest.mark.parametrize("seed", [2])
def test_tensorrt_backend_matches_torch_on_gpu(gpu_engines, tiny_ckpt, seed):
    """Needs: a CUDA GPU, TensorRT or TensorRT-RTX that can run the engines on it. The
    engines (fp32 native graphs) against the torch backend in float32 on the same GPU."""
    from bitdance_rt.runtime.backends.tensorrt_backend import TensorRTBackend

    model = load_checkpoint(tiny_ckpt, device="cuda")
    plan = plan_for(model, GenerationRequest("a lighthouse", 256, 896, steps=4, guidance=3.0,
                                             seed=seed))
    ours = generate(TensorRTBackend(load_checkpoint(tiny_ckpt, device="cuda", weights=False),
                                    gpu_engines), plan, seed)
    want = generate(TorchBackend(model), plan, seed)
    assert identical_fraction(ours, want) >= 0.99, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.trt
@needs_trt
@needs_gpu
def test_tensorrt_cuda_graphs_replay_the_eager_calls(gpu_engines, tiny_ckpt, tiny_model):
    """Needs: a CUDA GPU and TensorRT. The captured head loop and block step give the same
    tokens as the same engines called one by one, plan after plan (graphs reused)."""
    from bitdance_rt.runtime import generate_tokens
    from bitdance_rt.runtime.backends.tensorrt_backend import TensorRTBackend

    spec_only = load_checkpoint(tiny_ckpt, device="cuda", weights=False)
    graphs = TensorRTBackend(spec_only, gpu_engines, cuda_graphs=True)
    eager = TensorRTBackend(spec_only, gpu_engines, cuda_graphs=False)
    for guidance, seed in ((3.0, 1), (3.0, 2), (1.0, 3)):
        plan = small_plan(spec_only, guidance)
        assert torch.equal(generate_tokens(graphs, plan, seed),
                           generate_tokens(eager, plan, seed)), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.trt
@needs_trt
@needs_gpu
@pytest.mark.parametrize("seed", [4])
def test_tensorrt_head_loop_graph_past_50_steps(gpu_engines, tiny_ckpt, seed):
    """Needs: a CUDA GPU and TensorRT. N = 60: head_prepare (51 step times at most per call)
    runs twice per block, in slices of one size, inside the captured head loop; the same
    tokens as the engines called one by one."""
    from bitdance_rt.runtime import generate_tokens
    from bitdance_rt.runtime.backends.tensorrt_backend import TensorRTBackend

    spec_only = load_checkpoint(tiny_ckpt, device="cuda", weights=False)
    full = small_plan(spec_only, 3.0, h=4, w=4)
    plan = ImagePlan(h=4, w=4, cond_ids=full.cond_ids, uncond_ids=full.uncond_ids, steps=60,
                     guidance=3.0)
    graphs = TensorRTBackend(spec_only, gpu_engines, cuda_graphs=True)
    eager = TensorRTBackend(spec_only, gpu_engines, cuda_graphs=False)
    assert torch.equal(generate_tokens(graphs, plan, seed),
                       generate_tokens(eager, plan, seed)), f"seed {seed}"
