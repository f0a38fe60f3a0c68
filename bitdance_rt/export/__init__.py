"""ONNX export of BitDance: five graphs and a manifest per checkpoint (``bitdance-export``).

- ``prefill``      every prompt sequence (causal), then the image-start block: cond of block 0
- ``block_step``   one image block through the projector and the LLM (block mode, KV cache in)
- ``head_prepare`` the x-independent part of the head (condition embedding, every step's
                   modulations), once per block
- ``head_step``    one sampler step of the diffusion head (its x-dependent part) with guidance
                   fused in
- ``decoder``      latents to a uint8 image

One module per graph (its wrapper, example and random inputs, and the PyTorch outputs that
``check`` compares against); ``exporter`` writes a directory, ``manifest`` describes it,
``check`` compares it with PyTorch through Polygraphy, ``build`` turns its graphs into
TensorRT engines (``bitdance-export build``), ``native`` and ``attention`` hold the forms of
the KV attention, ``qdq`` the Q/DQ nodes of quantized checkpoints.
"""

from .exporter import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ, export_checkpoint, export_model
from ..manifest import GRAPHS, MANIFEST, read_manifest

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_SEQ", "GRAPHS", "MANIFEST", "export_checkpoint",
           "export_model", "read_manifest"]
