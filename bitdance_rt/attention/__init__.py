"""The KV-cache attention every AR step runs (in-place cache write + attention), in each form.

* ``kv_attention_ref`` - plain PyTorch (CPU path, test oracle, ONNX-traceable).
* ``kv_attention``     - ``torch.ops.bitdance.kv_attention`` (CPU: SDPA called as the authors'
  pipeline calls it; CUDA: the Triton kernel).
* ``triton_attention.kv_attention_triton`` / ``aot.compile_for_hopper`` - imported on demand
  so that importing this package does not require triton.
"""

from .op import kv_attention
from .plain import MODE_BLOCK, MODE_CAUSAL, kv_attention_ref

__all__ = ["kv_attention", "kv_attention_ref", "MODE_BLOCK", "MODE_CAUSAL"]
