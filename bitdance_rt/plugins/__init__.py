"""Attention kernels/ops for BitDance AR steps: in-place KV-cache write + attention.

* ``kv_attention_ref`` - plain PyTorch (CPU path, test oracle, ONNX-traceable).
* ``kv_attention``     - ``torch.ops.bitdance.kv_attention`` (CPU: reference, CUDA: Triton).
* ``triton_attention.kv_attention_triton`` / ``aot.compile_for_hopper`` - imported on demand
  so that importing this package does not require triton.
"""

from .op import kv_attention
from .reference import MODE_BLOCK, MODE_CAUSAL, kv_attention_ref

__all__ = ["kv_attention", "kv_attention_ref", "MODE_BLOCK", "MODE_CAUSAL"]
