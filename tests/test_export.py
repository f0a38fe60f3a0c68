"""ONNX export (five graphs + manifest), `bitdance-export check`, and the ONNX Runtime backend.

One export of the tiny P = 4 checkpoint (through the CLI) serves the whole module; the slow
tests add the P = 16 image check and a full-width 14B export with two LLM layers.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bitdance_rt.checkpoint import load_checkpoint, weights_fingerprint
from bitdance_rt.cli import export_app, rt_app
from bitdance_rt.errors import BitDanceError, EngineError
from bitdance_rt.export import GRAPHS, export_model
from bitdance_rt.export import check
from bitdance_rt.export.check import check_export
from bitdance_rt.export.head_prepare import HeadPrepare
from bitdance_rt.export.head_step import HeadStep
from bitdance_rt.export.source import identify_preset
from bitdance_rt.manifest import FORMAT, VERIFIED, remember_hashes, sha256_file, verify_hashes
from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime import StageTimer, generate, generate_tokens, plan_for
from bitdance_rt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from bitdance_rt.runtime.backends.torch_backend import TorchBackend
from bitdance_rt.sampling import (NoiseSource, em_update, head_modulations, sample_block,
                                  sample_block_premodulated, step_schedule)
from bitdance_rt.spec import preset
from bitdance_rt.tiny import random_model


def identical_fraction(a, b):
    return (a == b).all(-1).float().mean().item()


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def copy_of(export_dir, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(export_dir, dst)
    return dst


# -- the export and its manifest ---------------------------------------------------------------


def test_manifest_describes_every_graph(export_dir, tiny_model):
    import onnx

    m = json.loads((export_dir / "manifest.json").read_text())
    assert m["format"] == FORMAT == 4 and m["preset"] == "tiny-4x"
    assert m["config_hash"] == tiny_model.spec.config_hash()
    assert m["dtype"] == "fp32" and m["opset"] == 18 and m["attention"] == "standard"
    assert m["cache_slots"] is None and m["default_size"] == [1024, 1024]
    assert [256, 896] in m["sizes"]
    assert m["num_layers"] is None and m["limits"]["max_batch"] == 4
    assert {"torch", "onnx", "onnxscript", "polygraphy"} <= set(m["tools"])
    assert set(m["graphs"]) == set(GRAPHS)
    for name, g in m["graphs"].items():
        path = export_dir / g["file"]
        assert g["files"][g["file"]] == path.stat().st_size and not g["external_data"]
        assert g["sha256"][g["file"]] == hashlib.sha256(path.read_bytes()).hexdigest()
        onnx.checker.check_model(str(path), full_check=True)
        assert g["inputs"] and g["outputs"]
    io = {n: {v["name"]: v for v in m["graphs"][n]["inputs"] + m["graphs"][n]["outputs"]}
          for n in GRAPHS}
    assert io["block_step"]["k_cache"]["shape"] == [2, "rows", 2, "cache_slots", 32]
    assert io["block_step"]["tokens"]["shape"] == ["batch", 4, 32]
    assert io["block_step"]["new_keys"]["shape"] == [2, "rows", 2, 4, 32]
    assert io["prefill"]["input_ids"]["dtype"] == "int64"
    assert io["prefill"]["prompt_keys"]["shape"] == [2, "rows", 2, "prompt_len", 32]
    assert io["head_prepare"]["cond"]["shape"] == ["rows", 4, 128]
    assert io["head_prepare"]["times"]["shape"] == ["steps"]
    assert io["head_prepare"]["ada_mod"]["shape"] == ["steps", 2, "rows", 4, 768]
    assert io["head_prepare"]["final_mod"]["shape"] == ["steps", "rows", 4, 256]
    assert io["head_step"]["ada_mod"]["shape"] == [2, "rows", 4, 768]
    assert io["head_step"]["final_mod"]["shape"] == ["rows", 4, 256]
    assert "cond" not in io["head_step"]
    assert io["decoder"]["image"]["dtype"] == "uint8"
    assert m["graphs"]["decoder"]["dynamic_axes"]["latent"] == {"0": "batch", "2": "latent_h",
                                                                "3": "latent_w"}


def test_check_passes_for_every_graph(export_dir):
    rows, _ = check_export(export_dir, seed=1)
    assert {r.graph for r in rows} == set(GRAPHS)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert max(r.scaled_rel for r in rows if r.output != "image") < 1e-4
    r = CliRunner().invoke(export_app, ["check", str(export_dir), "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "block_step" in r.output and "19/19 outputs within tolerance" in r.output


def test_check_fails_above_tolerance(export_dir, monkeypatch):
    monkeypatch.setitem(check.TOLERANCE, "fp32", 1e-12)
    r = CliRunner().invoke(export_app, ["check", str(export_dir), "--seed", "3"])
    assert r.exit_code == 1 and "FAILED" in r.output


def test_head_graphs_reproduce_the_sampler(tiny_model):
    """The graph wrappers, run in PyTorch: head_prepare gives every step's modulations, and
    head_step k fed slice k of them (N Euler-Maruyama steps and the final Euler step as calls
    of one step function with other coefficients) gives the reference sampler's result (the
    whole network at every step) bit for bit."""
    prepare, step = HeadPrepare(tiny_model), HeadStep(tiny_model)
    net = tiny_model.head.net
    times, coeffs = step_schedule(5)
    gen = torch.Generator().manual_seed(3)
    for guidance, batch in ((4.0, 2), (1.0, 1), (3.0, 1)):
        rows = 2 * batch if guidance > 1 else batch
        cond = torch.randn(rows, 4, 128, generator=gen)
        noise = NoiseSource.from_seeds(9, "cpu").block(batch, 4, 32, 5, "cpu")
        with torch.no_grad():
            ref = sample_block(net, cond, noise, guidance, times, coeffs)
            assert torch.equal(ref, sample_block_premodulated(net, cond, noise, guidance, times,
                                                              coeffs))
            ada, final = prepare(cond, times)
            assert ada.shape == (6, 2, rows, 4, 768) and final.shape == (6, rows, 4, 256)
            want_ada, want_final = head_modulations(net, cond, times)
            assert torch.equal(ada, torch.stack(want_ada, dim=1))
            assert torch.equal(final, want_final)
            x = noise[0]
            for k in range(6):
                nz = noise[k + 1] if k < 5 else noise[0]  # final step: scale 0
                x = step(x, coeffs[k], nz, ada[k], final[k], torch.tensor([guidance]))
        assert torch.equal(x, ref)


def test_em_step_closed_form():
    """x_next = (1 - dt) x + (1 + t) dt v + sqrt(2 (1 - t) dt) n: the EM update simplified."""
    gen = torch.Generator().manual_seed(0)
    x, v, n = (torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(3))
    for t, dt in ((0.0, 0.1), (0.37, 0.05), (0.9, 0.05)):
        t, dt = torch.tensor(t, dtype=torch.float64), torch.tensor(dt, dtype=torch.float64)
        closed = (1 - dt) * x + (1 + t) * dt * v + torch.sqrt(2 * (1 - t) * dt) * n
        assert torch.allclose(em_update(x, v, t, dt, n), closed, rtol=1e-12, atol=1e-12)


def test_presets_and_truncated_loading(tiny_ckpt, tiny_model):
    assert identify_preset(preset("14b")) == "14b-64x"
    assert identify_preset(preset("14b-16x")) == "14b-16x"
    assert identify_preset(tiny_model.spec) == "tiny-4x"
    small = load_checkpoint(tiny_ckpt, num_layers=1)
    assert len(small.llm.model.layers) == 1 and small.spec.llm.num_hidden_layers == 1
    assert torch.equal(small.llm.model.layers[0].mlp.up_proj.weight,
                       tiny_model.llm.model.layers[0].mlp.up_proj.weight)
    assert small.extras["full_spec"].config_hash() == tiny_model.spec.config_hash()
    with pytest.raises(BitDanceError, match="--num-layers must be between"):
        load_checkpoint(tiny_ckpt, num_layers=3)


def test_cli_export_errors(tiny_ckpt, tmp_path):
    def run(*args):
        return CliRunner().invoke(export_app, list(args))

    out = str(tmp_path / "x")
    r = run("--checkpoint", str(tiny_ckpt), "--out", out, "--attention", "flash")
    assert r.exit_code == 2 and "unknown --attention" in r.output
    r = run("--checkpoint", str(tiny_ckpt), "--out", out, "--model", "14b")
    assert r.exit_code == 2 and "does not match the checkpoint" in r.output
    r = run("--checkpoint", str(tiny_ckpt))
    assert r.exit_code == 2 and "--out" in r.output
    r = run("--checkpoint", str(tiny_ckpt), "--out", out, "--dtype", "int4")
    assert r.exit_code == 2 and "--dtype" in r.output


# -- the ONNX Runtime backend ------------------------------------------------------------------

REQ = GenerationRequest("a quiet harbour", 256, 896, steps=2, guidance=3.0, seed=5)


@pytest.fixture(scope="module")
def torch_image(tiny_model):
    return generate(TorchBackend(tiny_model), plan_for(tiny_model, REQ), REQ.seed)


def test_onnxruntime_backend_matches_torch(export_dir, tiny_model, torch_image):
    backend = OnnxRuntimeBackend(tiny_model, export_dir)
    ours = generate(backend, plan_for(tiny_model, REQ), REQ.seed)
    assert ours.shape == torch_image.shape and ours.dtype == torch.uint8
    assert identical_fraction(ours, torch_image) >= 0.999
    # no guidance, two images, the backend's buffers reused: the same tokens
    # (N = 1 leaves x far from +-1, where float32 rounding flips signs; N = 2 does not)
    req = GenerationRequest("two boats", 256, 896, steps=2, guidance=1.0, seed=8, num_images=2)
    plan = plan_for(tiny_model, req)
    a = generate_tokens(backend, plan, req.seed)
    b = generate_tokens(TorchBackend(tiny_model), plan, req.seed)
    assert a.shape == (2, 16 * 56, 32) and (a == b).float().mean().item() >= 0.999


def test_head_reads_the_x_independent_part_once_per_block(export_dir, tiny_model):
    """Counted graph runs: per block one head_prepare and N + 1 head_step calls."""
    backend = OnnxRuntimeBackend(tiny_model, export_dir)
    plan = plan_for(tiny_model, REQ)
    files = {n: (export_dir / f"{n}.onnx").stat().st_size for n in ("head_prepare", "head_step")}
    timer = StageTimer("cpu")
    generate(backend, plan, REQ.seed, timer)
    blocks = plan.tokens // tiny_model.spec.parallel_num
    head = timer.stats["head"]
    assert head.calls == blocks * (REQ.steps + 2)
    assert head.weight_bytes == blocks * (files["head_prepare"]
                                          + (REQ.steps + 1) * files["head_step"])
    assert timer.stats["block_step"].calls == blocks - 1
    assert timer.stats["prefill"].calls == 1


def test_generate_cli_onnxruntime(export_dir, tiny_ckpt, torch_image, tmp_path):
    from PIL import Image

    path = tmp_path / "ort.png"
    r = CliRunner().invoke(rt_app, [
        "generate", "-c", str(tiny_ckpt), "-p", REQ.prompt, "--height", "256", "--width", "896",
        "--steps", "2", "--guidance", "3", "--seed", "5", "--device", "cpu", "--backend",
        "onnxruntime", "--engine-dir", str(export_dir), "--no-progress", "--timings",
        "--out", str(path)])
    assert r.exit_code == 0, r.output
    assert "head" in r.output
    image = torch.from_numpy(np.array(Image.open(path)))
    assert identical_fraction(image, torch_image[0]) >= 0.999


def test_generate_without_checkpoint_uses_the_exports_source(export_dir, tiny_ckpt, tmp_path):
    """--export-dir without --checkpoint: the checkpoint the manifest records (still there),
    said in one line; the same image as with -c."""
    args = ["generate", "-p", "x", "--height", "64", "--width", "96", "--steps", "1",
            "--backend", "onnxruntime", "--export-dir", str(export_dir), "--no-progress"]
    r = CliRunner().invoke(rt_app, [*args, "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert f"using {tiny_ckpt.resolve()}, the checkpoint {export_dir} was exported from" \
        in r.output
    r = CliRunner().invoke(rt_app, [*args, "-c", str(tiny_ckpt), "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")),
                          np.array(Image.open(tmp_path / "b.png")))


def test_refuses_another_models_export(export_dir, tiny16_ckpt, tiny_ckpt, tmp_path):
    with pytest.raises(EngineError, match="exported from another model"):
        OnnxRuntimeBackend(load_checkpoint(tiny16_ckpt), export_dir)
    r = CliRunner().invoke(rt_app, [
        "generate", "-c", str(tiny16_ckpt), "-p", "x", "--height", "256", "--width", "1024",
        "--device", "cpu", "--backend", "onnxruntime", "--engine-dir", str(export_dir)])
    assert r.exit_code == 2 and "exported from another model" in r.output
    # a truncated test export says so
    d = copy_of(export_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m.update(config_hash="0" * 16, num_layers=1)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="--num-layers 1"):
        OnnxRuntimeBackend(load_checkpoint(tiny_ckpt), d)


def test_refuses_an_export_of_other_weights(export_dir, tiny_ckpt, tmp_path):
    """Same shapes, other values (another seed): refused by the weights fingerprint."""
    from bitdance_rt.tiny import make_tiny

    other = make_tiny(tmp_path / "other", parallel_num=4, seed=9)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["weights_fingerprint"] == weights_fingerprint(tiny_ckpt)
    with pytest.raises(EngineError, match="other weights"):
        OnnxRuntimeBackend(load_checkpoint(other, weights=False), export_dir)
    r = CliRunner().invoke(rt_app, [
        "generate", "-c", str(other), "-p", "x", "--height", "256", "--width", "896",
        "--device", "cpu", "--backend", "onnxruntime", "--engine-dir", str(export_dir)])
    assert r.exit_code == 2 and "other weights" in r.output
    with pytest.raises(EngineError, match="other weights"):
        check_export(export_dir, other, graphs=("decoder",))


def test_refuses_an_export_of_an_older_version(export_dir, tiny_model, tmp_path):
    """A directory written before head_prepare existed: no such graph in its manifest, and a
    head_step graph that takes cond and t instead of the modulations."""
    import onnx
    from onnx import TensorProto, helper

    d = copy_of(export_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    del m["graphs"]["head_prepare"]
    (d / "head_prepare.onnx").unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="lists no 'head_prepare' graph: .* written by another "
                                          "version of bitdance-export.* re-export it"):
        OnnxRuntimeBackend(tiny_model, d)
    r = CliRunner().invoke(export_app, ["check", str(d)])
    assert r.exit_code == 2 and "re-export it" in r.output
    # a head_step graph with the old inputs, listed next to a head_prepare graph
    shutil.copy(export_dir / "head_prepare.onnx", d / "head_prepare.onnx")
    old = [("x", [1, 4, 32]), ("t", [1]), ("coeffs", [3]), ("noise", [1, 4, 32]),
           ("cond", [2, 4, 128]), ("guidance", [1])]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_next"])], "head_step",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in old],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 4, 32])])
    ir = onnx.load(str(export_dir / "head_step.onnx"), load_external_data=False).ir_version
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=ir), str(d / "head_step.onnx"))
    m = json.loads((export_dir / "manifest.json").read_text())
    m["graphs"]["head_step"]["files"] = {"head_step.onnx": (d / "head_step.onnx").stat().st_size}
    m["graphs"]["head_step"]["sha256"] = {"head_step.onnx": sha256_file(d / "head_step.onnx")}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"head_step.onnx lacks the inputs \['ada_mod', "
                                          r"'final_mod'\]: .* re-export it"):
        OnnxRuntimeBackend(tiny_model, d)


def test_weights_fingerprint(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    base = weights_fingerprint(d)
    assert base == weights_fingerprint(tiny_ckpt)
    # a change of values inside a large file, at one of the sampled places, is seen
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    head = 8 + int.from_bytes(data[:8], "little")
    span = len(data) - head - 4096
    data[head + span * 7 // 15 + 100] ^= 0xFF  # inside the 8th of the 16 samples
    data[head + span * 5 // 11] ^= 0xFF  # between samples: not seen (documented)
    path.write_bytes(bytes(data))
    assert weights_fingerprint(d) != base
    data[head + span * 7 // 15 + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert weights_fingerprint(d) == base
    (d / "projector.safetensors").unlink()
    with pytest.raises(BitDanceError, match="projector.safetensors"):
        weights_fingerprint(d)


def test_spec_only_loading(tiny_ckpt, tmp_path):
    m = load_checkpoint(tiny_ckpt, weights=False)
    assert m.llm is None and m.head is None and m.tokenizer is not None
    assert m.spec.config_hash() == load_checkpoint(tiny_ckpt).spec.config_hash()
    with pytest.raises(BitDanceError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", weights=False)


def test_refuses_missing_or_corrupt_files(export_dir, tiny_model, tmp_path):
    d = copy_of(export_dir, tmp_path)
    (d / "head_step.onnx").unlink()
    with pytest.raises(EngineError, match="head_step.onnx is missing"):
        OnnxRuntimeBackend(tiny_model, d)
    shutil.copy(export_dir / "head_step.onnx", d / "head_step.onnx")
    data = (d / "decoder.onnx").read_bytes()
    (d / "decoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="decoder.onnx is corrupt or truncated"):
        OnnxRuntimeBackend(tiny_model, d)
    (d / "decoder.onnx").write_bytes(b"\x07garbage" * (len(data) // 8) + b"x" * (len(data) % 8))
    with pytest.raises(EngineError, match="decoder.onnx has changed since it was written.*"
                                          "re-run `bitdance-export`"):
        OnnxRuntimeBackend(tiny_model, d)
    r = CliRunner().invoke(export_app, ["check", str(d)])
    assert r.exit_code == 2 and "decoder.onnx" in r.output
    # a file the manifest vouches for but ONNX Runtime cannot read (an export bug, not damage)
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"]["decoder"]["sha256"]["decoder.onnx"] = sha256_file(d / "decoder.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="cannot load graph file .*decoder.onnx"):
        OnnxRuntimeBackend(tiny_model, d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="manifest.json is not valid JSON"):
        OnnxRuntimeBackend(tiny_model, d)
    (d / "manifest.json").unlink()
    with pytest.raises(EngineError, match="manifest.json is missing"):
        OnnxRuntimeBackend(tiny_model, d)


def test_limits_and_attention_are_enforced(export_dir, tiny_model, tmp_path):
    d = copy_of(export_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["limits"]["max_seq"] = 100
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="--max-seq"):
        generate(OnnxRuntimeBackend(tiny_model, d), plan_for(tiny_model, REQ), REQ.seed)
    m["attention"] = "plugin"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="re-export with --attention native"):
        OnnxRuntimeBackend(tiny_model, d)


# -- every trusted file checked; staged exports; the command line ---------------------------


def test_flipped_bytes_in_a_graph_are_refused(export_dir, tiny_ckpt, tmp_path):
    """4 KB of block_step.onnx flipped (same size): generate refuses it before any work, with
    exit 2 and a message naming the file and the fix (it used to make another image)."""
    d = copy_of(export_dir, tmp_path)
    path = d / "block_step.onnx"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))
    assert path.stat().st_size == (export_dir / "block_step.onnx").stat().st_size
    r = CliRunner().invoke(rt_app, [
        "generate", "-c", str(tiny_ckpt), "-p", "x", "--height", "256", "--width", "896",
        "--device", "cpu", "--backend", "onnxruntime", "--engine-dir", str(d),
        "--no-progress", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2, r.output
    assert "block_step.onnx has changed since it was written" in r.output
    assert f"re-run `bitdance-export` into {d}" in r.output
    assert not (tmp_path / "x.png").exists() and "Traceback" not in r.output


def test_verified_hashes_are_remembered(tmp_path):
    """A verified file is not read again while its size, times and inode stay; a write is
    always rehashed, also when the old modification time is put back."""
    d = tmp_path / "x"
    d.mkdir()
    f = d / "g.onnx"
    f.write_bytes(np.random.default_rng(0).bytes(8192))  # fixed content: the same run each time
    sha = sha256_file(f)
    verify_hashes(d, {"g.onnx": sha}, "graph file", "fix it")
    assert json.loads((d / VERIFIED).read_text())["g.onnx"][-1] == sha
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="g.onnx has changed since it was written.*fix it"):
        verify_hashes(d, {"g.onnx": sha}, "graph file", "fix it")
    # the same damage with the old mtime put back (touch -r): the change time still moved
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    with pytest.raises(EngineError, match="g.onnx has changed since it was written"):
        verify_hashes(d, {"g.onnx": sha}, "graph file", "fix it")
    data[100] ^= 1
    f.write_bytes(bytes(data))
    verify_hashes(d, {"g.onnx": sha}, "graph file", "fix it")
    remember_hashes(d, {"other": sha})  # a file that is not there is not recorded
    assert set(json.loads((d / VERIFIED).read_text())) == {"g.onnx"}


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_reexport_keeps_the_previous_export(export_dir, tiny_ckpt, tmp_path,
                                                         monkeypatch, failure):
    """A re-export over a working export that stops mid-way (Ctrl-C, or an error) leaves the
    previous export exactly as it was, and no staging directory."""
    from bitdance_rt.export import common

    d = copy_of(export_dir, tmp_path)
    before = _snapshot(d)
    calls = []

    def partial_export(gdef, out_dir, *args, **kwargs):
        calls.append(out_dir)
        (out_dir / gdef.filename).write_bytes(b"half a graph")
        raise failure("stopped mid-export")

    monkeypatch.setattr(common, "export_onnx", partial_export)  # what write_graphs calls
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out", str(d)])
    assert calls and calls[0] != d  # it wrote into a staging directory, not into d
    if failure is KeyboardInterrupt:
        assert r.exit_code == 130 and "interrupted" in r.output
    else:
        assert r.exit_code == 1 and "stopped mid-export" in r.output
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    OnnxRuntimeBackend(load_checkpoint(tiny_ckpt, weights=False), d)  # still usable


def test_out_that_is_not_an_export_is_refused(tiny_ckpt, tmp_path):
    """Never mix into, or replace, a directory of other files; a file is not a directory."""
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"jpeg")
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out", str(d)])
    assert r.exit_code == 2 and "is not empty and holds no manifest.json" in r.output
    assert [p.name for p in d.iterdir()] == ["holiday.jpg"]
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(export_app, ["--checkpoint", str(tiny_ckpt), "--out", str(f)])
    assert r.exit_code == 2 and "is a file" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos"]


def test_usage(tmp_path):
    """No arguments: the usage on stderr and exit 2; --help leads with how to export."""
    r = CliRunner().invoke(export_app, [])
    assert r.exit_code == 2
    assert "bitdance-export --checkpoint CKPT --out DIR" in r.output
    r = CliRunner().invoke(export_app, ["--help"])
    assert r.exit_code == 0
    head = r.output.split("Options:")[0]
    for usage in ("bitdance-export --checkpoint CKPT --out DIR", "--engines",
                  "bitdance-export build DIR", "bitdance-export check DIR"):
        assert usage in head


# -- slow ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_a_reexport_keeps_the_previous_export(export_dir, tiny_ckpt, tmp_path):
    """The real thing: SIGINT to a `bitdance-export` process once its staging directory holds
    a graph; it exits 130 with one line, and the previous export is untouched."""
    import signal
    import subprocess
    import sys
    import time

    d = copy_of(export_dir, tmp_path)
    before = _snapshot(d)
    proc = subprocess.Popen([sys.executable, "-c", "from bitdance_rt.cli import export_entry; "
                             "export_entry()", "--checkpoint", str(tiny_ckpt), "--out", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        stages = [p for p in tmp_path.iterdir() if p.name.endswith(".staging")]
        if stages and any(f.suffix == ".onnx" for f in stages[0].iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted"
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


@pytest.mark.slow
def test_p16_without_guidance_matches_torch(tiny16_ckpt, tmp_path):
    from bitdance_rt.export import export_checkpoint

    export_checkpoint(tiny16_ckpt, tmp_path / "e16")
    assert all(r.passed for r in check_export(tmp_path / "e16", seed=0)[0])
    model = load_checkpoint(tiny16_ckpt)
    req = GenerationRequest("a lighthouse", 256, 1024, steps=10, guidance=1.0, seed=3)
    plan = plan_for(model, req)
    a = generate(OnnxRuntimeBackend(model, tmp_path / "e16"), plan, req.seed)
    b = generate(TorchBackend(model), plan, req.seed)
    assert identical_fraction(a, b) >= 0.999


@pytest.mark.slow
def test_full_width_14b_two_layers(tmp_path):
    """14b-64x shapes, random weights, LLM cut to 2 layers (fp16: ~7 GB of weights; ONNX
    Runtime's CPU provider runs fp16 graphs, not bf16 ones): every graph passes the path-based
    onnx.checker, the large ones use external data, and the graphs whose PyTorch side fits a
    CPU run compare with PyTorch within the fp16 tolerance (`check`'s own comparison: the LLM
    graphs, head_prepare and the decoder; head_step's 1.76 B-parameter network in fp16 on the
    CPU takes minutes per call and is left to the tiny models and the GPU)."""
    import dataclasses
    import gc
    import time

    import onnx

    full = preset("14b")
    spec = dataclasses.replace(full, llm=dataclasses.replace(full.llm, num_hidden_layers=2))
    model = random_model(spec, dtype=torch.float16)
    model.llm.lm_head = None  # not part of any graph
    model.extras["full_spec"] = full
    manifest = export_model(model, tmp_path / "e", preset_name="14b-64x", progress=print)
    d = tmp_path / "e"
    assert manifest["num_layers"] == 2 and manifest["config_hash"] == spec.config_hash()
    assert manifest["graphs"]["prefill"]["external_data"]
    assert manifest["graphs"]["head_step"]["external_data"]
    for name in GRAPHS:
        onnx.checker.check_model(str(d / manifest["graphs"][name]["file"]))
    gc.collect()
    t0 = time.perf_counter()
    rows, _ = check_export(d, seed=0, model=model,
                           graphs=("prefill", "block_step", "head_prepare", "decoder"))
    print(check.format_table(rows, {"dtype": "fp16"}), f"\n{time.perf_counter() - t0:.0f}s")
    assert {r.graph for r in rows} == {"prefill", "block_step", "head_prepare", "decoder"}
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_export_default_max_seq_fits_the_models_positions(monkeypatch, tmp_path):
    """Without --max-seq the export takes 4608 KV slots, or every position of a model that has
    fewer (the demo model: 4096); a given --max-seq is taken as given (and checked)."""
    import bitdance_rt.export as export_pkg
    from bitdance_rt.cli import export_app
    from bitdance_rt.demo import WEIGHTS_DIR

    seen = []

    def fake(checkpoint, out, **kw):
        seen.append(kw["max_seq"])
        return {"graphs": {}, "preset": "x", "dtype": "fp32", "attention": "standard"}

    monkeypatch.setattr(export_pkg, "export_checkpoint", fake)
    for extra, want in (([], 4096), (["--max-seq", "2000"], 2000)):
        r = CliRunner().invoke(export_app, ["--checkpoint", str(WEIGHTS_DIR), "--out",
                                            str(tmp_path / "o")] + extra)
        assert r.exit_code == 0, r.output
        assert seen[-1] == want, (extra, seen)
