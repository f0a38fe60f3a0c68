"""TensorRT plugin ``bitdance::kv_attend`` (attention over the cache; it reads the cache, the
runtime writes it) through TensorRT's Python plugin API.

The plugin is a Quick Deployable Plugin (``tensorrt.plugin``) with only an ahead-of-time
implementation: at engine build time the Triton kernel (``_kv_attn_kernel_trt``) is compiled
to PTX for the shapes and dtype in the network and embedded in the engine, so a built engine
runs without Python (and without Triton) at inference time. Building the engine needs Python,
TensorRT >= 10.8 (``tensorrt.plugin.aot_impl``) and Triton; running it needs only TensorRT.

Node contract (the ONNX node of ``onnx_node.py``): attention of T new tokens over the first
``cache_lens[b]`` slots of the cache and over themselves, without writing the cache (an
exported graph returns the new keys and values and the runtime stores them, as for ONNX
Runtime):

    inputs   q [B, Hq, T, D], k_new [B, Hkv, T, D], v_new [B, Hkv, T, D],
             k_cache [B, Hkv, S_max, D], v_cache [B, Hkv, S_max, D], cache_lens [B] int32
    attrs    mask_mode: int (0 block, 1 causal), scale: float (<= 0 means D ** -0.5)
    outputs  out [B, Hq, T, D]

Head counts and head dim must be build-time constants in the network; B, T and S_max may be
dynamic (they are passed to the kernel as int32 arguments). Note: Triton 3.x kernels declare
two trailing scratch-pointer parameters that TensorRT does not pass; this kernel uses no
global scratch: the AOT compile removes them from the PTX entry (see ``aot.py``), so the entry
takes exactly the 9 arguments TensorRT passes, and its launch stays within the 48 KiB of dynamic
shared memory a kernel gets without opting in.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
decorated functions as classes (``issubclass``); postponed (string) annotations make
registration raise ``TypeError``.
"""

PLUGIN_NAMESPACE = "bitdance"
PLUGIN_NAME = "kv_attend"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

_state = {"registered": False}


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): whether ``tensorrt.plugin`` can be imported here."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except ImportError as e:
        return False, (f"tensorrt is not importable ({e}); the plugin needs datacenter "
                       "TensorRT >= 10.8 (pip install tensorrt, from NVIDIA's package index); "
                       "TensorRT-RTX, which bitdance-rt[trt] installs, has no plugins: use "
                       "--attention native there")
    return True, ""


def register_plugin() -> str:
    """Register the plugin with TensorRT's plugin registry (idempotent); returns its id."""
    if _state["registered"]:
        return PLUGIN_ID
    ok, reason = tensorrt_status()
    if not ok:
        raise ImportError(reason)
    from typing import Tuple

    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .aot import compile_trt_entry

    dtypes = {trt.bfloat16: "bf16", trt.float16: "fp16", trt.float32: "fp32"}

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                  k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                  cache_lens: trtp.TensorDesc, mask_mode: int, scale: float,
                  ) -> Tuple[trtp.TensorDesc]:
        return q.like()

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                 k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                 cache_lens: trtp.TensorDesc, mask_mode: int, scale: float,
                 outputs: Tuple[trtp.TensorDesc], tactic: int,
                 ) -> Tuple[str, str, trtp.KernelLaunchParams, trtp.SymExprs]:
        if q.dtype not in dtypes:
            raise ValueError(f"{PLUGIN_ID}: unsupported dtype {q.dtype}")
        n_q = q.shape_expr[1].constant_value()
        n_kv = k_new.shape_expr[1].constant_value()
        head_dim = q.shape_expr[3].constant_value()
        t_expr, b_expr, s_expr = q.shape_expr[2], q.shape_expr[0], k_cache.shape_expr[2]
        t_hint = t_expr.constant_value() if t_expr.is_constant else 64
        info = compile_trt_entry(dtypes[q.dtype], head_dim, n_q, n_kv,
                                 scale if scale > 0 else None, mask_mode == 1, t_hint)
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(t_expr * info["group"], info["block_m"])
        params.grid_y = b_expr * n_kv
        params.block_x = info["num_warps"] * 32
        params.shared_mem = info["shared"]
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(t_expr)
        extra[1] = trtp.SymInt32(s_expr)
        return info["name"], info["ptx"], params, extra

    _state["registered"] = True
    return PLUGIN_ID
