"""The ONNX Runtime backend: the graphs of a ``bitdance-export`` directory in ONNX Runtime
sessions, under the generic loop of :class:`~.graph_runtime.GraphRuntime`.

Every graph call goes through IO binding onto torch tensors (``data_ptr``), on the CPU as on
CUDA: inputs are read and outputs written in place, so on CUDA nothing leaves the device
between calls (a native graph's cache output is bound to its input's memory). The directory
must match the checkpoint (the manifest's config hash and, for a checkpoint read from a
directory, its weights fingerprint), and its graph files must be those the export wrote
(sizes and sha256); otherwise :class:`~bitdance_rt.errors.EngineError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import dtypes
from ...checkpoint import BitDanceModel
from ...errors import EngineError
from ...manifest import GRAPHS, check_files, graph_file, ort_session_options, read_manifest
from .graph_runtime import GraphRuntime


class OnnxRuntimeBackend(GraphRuntime):
    name = "onnxruntime"

    def __init__(self, model: BitDanceModel, engine_dir, providers: list | None = None):
        self.engine_dir = Path(engine_dir)
        manifest = read_manifest(self.engine_dir)
        super().__init__(model, manifest, self.engine_dir)
        if self.device.type == "cpu" and manifest["dtype"] == "bf16":
            raise EngineError(
                f"{self.engine_dir} holds bf16 graphs, which ONNX Runtime's CPU provider cannot "
                "run; use --device cuda, or re-export with --dtype fp32 (or fp16) for the CPU")
        if self.attention not in ("standard", "native"):
            raise EngineError(
                f"{self.engine_dir} was exported with --attention {self.attention} (a custom "
                "node for the TensorRT plugin), which ONNX Runtime cannot run; re-export with "
                "--attention native (or standard)")
        check_files(manifest, self.engine_dir)
        self._dev = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        self.providers = providers or self._providers()
        self.sessions = {name: self._load(name) for name in GRAPHS}

    def _providers(self) -> list:
        return providers_for(self.device)

    def _load(self, name: str):
        session = load_session(self.manifest, self.engine_dir, name, self.providers,
                               self.device.type == "cpu")
        self.check_inputs(name, {i.name for i in session.get_inputs()},
                          graph_file(self.manifest, self.engine_dir, name))
        return session

    def _graph_bytes(self, name: str) -> int:
        return sum(self.manifest["graphs"][name]["files"].values())

    def _run(self, name: str, inputs: dict, outputs: dict) -> None:
        run_bound(self.sessions[name], self._dev, inputs, outputs)


def providers_for(device: torch.device) -> list:
    """ONNX Runtime's providers for ``device`` (CUDA: on torch's current stream)."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EngineError("this onnxruntime has no CUDA provider; install onnxruntime-gpu or "
                          "use --device cpu")
    # ORT runs on torch's current stream, so its work is ordered with the tensors it binds.
    stream = torch.cuda.current_stream(device).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                       "user_compute_stream": str(stream)}),
            "CPUExecutionProvider"]


def load_session(manifest: dict, engine_dir, name: str, providers: list, cpu: bool):
    """An ONNX Runtime session of graph ``name`` (its files checked first: sizes, hashes)."""
    import onnxruntime as ort

    engine_dir = Path(engine_dir)
    path = graph_file(manifest, engine_dir, name)  # checked, then loaded
    opts = ort_session_options(manifest, cpu)
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # ORT raises several types for unreadable or invalid models
        raise EngineError(
            f"ONNX Runtime cannot load graph file {path}: it is corrupt or not an ONNX model "
            f"({str(e).strip().splitlines()[0][:200]}); re-run `bitdance-export` into "
            f"{engine_dir}") from None


def run_bound(session, dev: tuple, inputs: dict, outputs: dict) -> None:
    """Bind torch tensors (device memory, no copies) as a session's inputs and outputs and
    run it; ``dev``: ("cpu", 0) or ("cuda", index)."""
    binding = session.io_binding()
    keep = []
    kind, index = dev
    for key, t in inputs.items():
        t = t.contiguous()
        keep.append(t)
        binding.bind_input(key, kind, index, dtypes.ort_element_type(t.dtype), tuple(t.shape),
                           t.data_ptr())
    for key, t in outputs.items():
        binding.bind_output(key, kind, index, dtypes.ort_element_type(t.dtype), tuple(t.shape),
                            t.data_ptr())
    session.run_with_iobinding(binding)
