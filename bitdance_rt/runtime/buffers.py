"""Per-size buffers every backend needs: the memory check for its KV cache and the position
embeddings of the image blocks, and the shapes of the head's per-block modulations."""

from __future__ import annotations

import math
import os

import torch

from ..errors import ResourceError
from ..models.posemb import image_posemb


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on Linux: do not block
        return 1 << 62


def modulation_shapes(spec, rows: int, steps: int) -> tuple[tuple, tuple]:
    """The head's x-independent outputs kept for a block, for each of the N + 1 step times:
    the adaLN modulations of every shared block ``[N + 1, A, rows, P, 6C]`` and of the final
    layer ``[N + 1, rows, P, 2C]``."""
    n, p, c = steps + 1, spec.parallel_num, spec.head.ch_latent
    return (n, spec.head.depth_adanln, rows, p, 6 * c), (n, rows, p, 2 * c)


def modulation_bytes(spec, rows: int, steps: int, dtype) -> int:
    """Bytes of :func:`modulation_shapes` (about 0.9 GB for the 14B head with guidance,
    N = 50, one image, bf16)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) for s in modulation_shapes(spec, rows, steps)) * itemsize


def ensure_cache_fits(need: int, have: int, rows: int, max_len: int, device,
                      extra: int = 0) -> None:
    """Refuse, before allocating, a KV cache (``need`` bytes) that would not fit in ``have``
    bytes together with the ``extra`` bytes of other per-plan buffers."""
    if need + extra > 0.9 * have:
        raise ResourceError(
            f"the KV cache for {rows} sequences of {max_len} tokens needs {need / 2**30:.1f} "
            f"GiB (and the head's modulations {extra / 2**30:.1f} GiB) but only "
            f"{have / 2**30:.1f} GiB is free on {device}; generate fewer images at once "
            "(--num-images) or a smaller size")


def block_posembs(spec, h: int, w: int, device) -> torch.Tensor:
    """``[h*w/P + 1, P, H]``: each block's 2-D position embedding, plus one zero block so that
    block k + 1 exists for every k (graphs index it)."""
    p, hidden = spec.parallel_num, spec.llm.hidden_size
    pe = image_posemb(hidden, h, w, spec.patch).view(-1, p, hidden)
    return torch.cat([pe, torch.zeros(1, p, hidden)]).to(device)
