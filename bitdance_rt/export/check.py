"""``bitdance-export check``: every graph in ONNX Runtime against PyTorch, through Polygraphy.

Each graph runs on fresh random inputs in ONNX Runtime (CPU provider) and in PyTorch. The
PyTorch side is not the exported wrapper but the code paths the runtime and the reference use
(the static KV cache and its attention op, :mod:`bitdance_rt.sampling`, ``ae.decode`` and the
pipeline's uint8 conversion), so a pass checks the graph's semantics as well as the export.
Polygraphy's comparator compares the outputs; the gate is the error relative to the output's
scale, ``max|ort - torch| / max|torch|``, against the dtype's tolerance (elementwise relative
error is reported too, but it is unbounded where the reference is near zero). The decoder's
uint8 image may differ by one level where a value sits on a truncation boundary; its float
output (the last convolution, exposed for the check) carries the relative gate.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import BitDanceError, EngineError
from . import block_step, decoder, head_prepare, head_step, prefill
from .. import dtypes
from ..manifest import (GRAPHS, IMAGENET_GRAPHS, check_files, check_model, check_weights, graph_file,
                        ort_session_options, read_manifest)

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Graphs that quantize activations: ONNX Runtime and PyTorch may round a value on a
# quantization boundary to neighbouring codes, so the gate is about one step's effect
QDQ_ACTIVATION_TOLERANCE = 3e-2
# uint8 image: (most levels apart, least fraction of identical values)
IMAGE_GATE = {"fp32": (1, 0.999), "fp16": (2, 0.0)}


@dataclass
class Row:
    graph: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    scaled_rel: float
    identical: float
    passed: bool


def cases(model, gen: torch.Generator, slots: int | None = None) -> dict[str, list[tuple[str, dict]]]:
    """Fresh random inputs: ragged lengths, with and without guidance, EM and final steps.
    ``slots``: the static cache length of a native export (None: standard graphs)."""
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    native = slots is not None
    lens = [ri(3, 24) for _ in range(3)]
    cache_lens = [ri(1, 30), ri(1, 30)]
    return {
        "prefill": [(f"lens={lens}", prefill.random_inputs(model, gen, lens, slots))],
        "block_step": [
            ("cfg", block_step.random_inputs(model, gen, 2, cache_lens * 2, slots or 33,
                                             native)),
            ("no-cfg", block_step.random_inputs(model, gen, 1, [ri(1, 30)], slots or 31,
                                                native)),
        ],
        "head_prepare": [
            ("cfg,N=6", head_prepare.random_inputs(model, gen, 4, 6)),
            ("no-cfg,N=1", head_prepare.random_inputs(model, gen, 1, 1)),
        ],
        "head_step": [
            ("cfg,em", head_step.random_inputs(model, gen, 2, guided=True, final=False)),
            ("no-cfg,final", head_step.random_inputs(model, gen, 1, guided=False, final=True)),
        ],
        "decoder": [("4x6", decoder.random_inputs(model, gen, 1, 4, 6))],
    }


PYTORCH_OUTPUTS = {"prefill": prefill.pytorch_outputs, "block_step": block_step.pytorch_outputs,
                   "head_prepare": head_prepare.pytorch_outputs,
                   "head_step": head_step.pytorch_outputs, "decoder": decoder.pytorch_outputs}


def _expose_decoded(path: Path, tmp: Path, dtype: str) -> str:
    """A copy of the decoder graph with its float image (the last Conv's output) as an extra
    output named ``decoded``."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise EngineError(f"{path} cannot be read as an ONNX model ({e}); it is corrupt, "
                          "re-run the export") from None
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        raise EngineError(f"{path} has no Conv node; is it a decoder graph?")
    model.graph.node.append(helper.make_node("Identity", [convs[-1].output[0]], ["decoded"]))
    elem = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}[dtype]
    model.graph.output.append(helper.make_tensor_value_info("decoded", elem, None))
    out = tmp / "decoder_check.onnx"
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > 2**31 - 2**26,
              location="decoder_check.onnx.data")
    return str(out)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def gate(manifest: dict) -> float:
    """The largest error relative to an output's scale that passes, for this export."""
    tolerance = TOLERANCE.get(manifest["dtype"], 0.0)
    if any(q.endswith("-activations") for q in manifest.get("quantization") or ()):
        tolerance = max(tolerance, QDQ_ACTIVATION_TOLERANCE)
    return tolerance


def _compare(graph, case, ort_session, ref_fn, feeds, dtype, tolerance):
    """Run both sides through Polygraphy's comparator; rows of per-output errors."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name="pytorch")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for name, arr in feeds.items():
                meta.add(name, dtype=arr.dtype, shape=arr.shape)
            return meta

        def infer_impl(self, feed_dict):
            self.inference_time = 0.0
            with torch.no_grad():
                out = ref_fn({k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()})
            return OrderedDict((k, _numpy(v)) for k, v in out.items())

    feed_np = OrderedDict((k, _numpy(v)) for k, v in feeds.items())
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run([OnnxrtRunner(ort_session, name="onnxruntime"), TorchRunner()],
                                 data_loader=[feed_np])
        ort_out = results[0][1][0]
        ref_out = results[1][1][0]
        atol, rtol = {}, {}
        for name in ort_out.keys():
            ref = np.asarray(ref_out[name])
            if ref.dtype == np.uint8:
                atol[name], rtol[name] = float(IMAGE_GATE[dtype][0]), 0.0
            else:
                atol[name] = tolerance * float(np.abs(ref.astype(np.float64)).max() or 1)
                rtol[name] = tolerance
        with np.errstate(divide="ignore", invalid="ignore"):  # rel. error where ref is 0
            acc = Comparator.compare_accuracy(
                results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    metrics = next(iter(acc[0].values()))[0]
    rows = []
    for name in ort_out.keys():
        a = np.asarray(ort_out[name]).astype(np.float64)
        b = np.asarray(ref_out[name]).astype(np.float64)
        m = metrics[name]
        identical = float((a == b).mean()) if a.shape == b.shape else 0.0
        scaled = float(np.abs(a - b).max() / (np.abs(b).max() or 1.0)) if a.shape == b.shape \
            else float("inf")
        ok = bool(m)
        if np.asarray(ref_out[name]).dtype == np.uint8:
            ok = ok and identical >= IMAGE_GATE[dtype][1]
        rows.append(Row(graph, case, name, m.max_absdiff, m.max_reldiff, scaled, identical, ok))
    return rows


def check_export(engine_dir, checkpoint=None, seed: int | None = None,
                 graphs=GRAPHS, model=None) -> tuple[list[Row], int]:
    """Compare every graph of ``engine_dir`` with PyTorch; returns (rows, seed used).
    ``model``: the in-memory model it was exported from (instead of a checkpoint)."""
    import onnxruntime as ort

    from ..limits import MAX_SEED

    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise BitDanceError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    d = Path(engine_dir)
    manifest = read_manifest(d)
    imagenet = manifest.get("family") == "imagenet"
    if imagenet and graphs == GRAPHS:
        graphs = IMAGENET_GRAPHS
    check_files(manifest, d, graphs)
    dtype = manifest["dtype"]
    if dtype not in TOLERANCE:
        raise EngineError(
            f"{d} holds {dtype} graphs, which ONNX Runtime's CPU provider cannot run; check an "
            "fp32 or fp16 export of the same checkpoint (--dtype fp32)")
    if manifest.get("attention") == "plugin":
        raise EngineError(
            f"{d} was exported with --attention plugin, whose custom node ONNX Runtime cannot "
            "run; check an --attention native (or standard) export of the same checkpoint")
    if model is None:
        ckpt = checkpoint or manifest.get("source", {}).get("checkpoint")
        if not ckpt or not Path(ckpt).is_dir():
            raise EngineError(f"check needs the checkpoint {d} was exported from; pass "
                              "--checkpoint DIR" + (f" ({ckpt} does not exist)" if ckpt else ""))
        if imagenet:
            from ..checkpoint import family_of
            from ..imagenet.checkpoint import weight_files
            from .imagenet import load_for_check

            if family_of(ckpt) != "imagenet":
                raise EngineError(f"{d} holds a class-conditional ImageNet model's graphs and "
                                  f"{ckpt} is not such a checkpoint; pass --checkpoint, the "
                                  "directory it was exported from")

            model = load_for_check(ckpt, dtypes.parse(dtype))
            check_weights(manifest, ckpt, d, files=weight_files(ckpt))
        else:
            model = load_checkpoint(ckpt, dtype=dtypes.parse(dtype),
                                    num_layers=manifest.get("num_layers"))
            check_weights(manifest, ckpt, d)
    check_model(manifest, model.spec, d)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    slots = manifest.get("cache_slots") if manifest.get("attention") == "native" else None
    if imagenet:
        from . import imagenet as family

        all_cases, outputs = family.check_cases(model, gen), family.pytorch_outputs()
    else:
        all_cases, outputs = cases(model, gen, slots), PYTORCH_OUTPUTS
    rows = []
    opts = ort_session_options(manifest, cpu=True)
    tolerance = gate(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        for name in graphs:
            path = graph_file(manifest, d, name)
            if name == "decoder":
                path = _expose_decoded(path, Path(tmp), dtype)
            try:
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise EngineError(f"ONNX Runtime cannot load {path} ({str(e).strip()[:300]}); "
                                  "re-run the export") from None
            want = sorted(i["name"] for i in manifest["graphs"][name]["inputs"])
            got = sorted(i.name for i in session.get_inputs())
            if got != want:  # another graph's file under this graph's name
                raise EngineError(f"{path.name} takes the inputs {', '.join(got)}, not those the "
                                  f"manifest lists for {name} ({', '.join(want)}); re-run the "
                                  "export")
            ref_fn = lambda feeds, name=name: outputs[name](model, feeds)  # noqa: E731
            for case, feeds in all_cases[name]:
                rows += _compare(name, case, session, ref_fn, feeds, dtype, tolerance)
            del session
    return rows, seed


def format_table(rows: list[Row], manifest: dict) -> str:
    head = (f"{'graph':<13}{'case':<18}{'output':<15}{'max abs':>11}{'max rel':>11}"
            f"{'rel/scale':>11}{'identical':>11}  result")
    lines = [head, "-" * len(head)]
    for r in rows:
        rel = "-" if r.max_rel != r.max_rel else f"{r.max_rel:.3e}"  # nan: every value equal
        lines.append(f"{r.graph:<13}{r.case[:17]:<18}{r.output:<15}{r.max_abs:>11.3e}"
                     f"{rel:>11}{r.scaled_rel:>11.3e}{100 * r.identical:>10.2f}%  "
                     f"{'ok' if r.passed else 'FAIL'}")
    dtype = manifest["dtype"]
    levels, same = IMAGE_GATE[dtype]
    lines.append(f"gate ({dtype}): rel/scale = max|ort - torch| / max|torch| <= "
                 f"{gate(manifest):g}; uint8 image: |diff| <= {levels}"
                 + (f" and >= {100 * same:g}% identical" if same else ""))
    return "\n".join(lines)
