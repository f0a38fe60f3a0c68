"""Per-size buffers every backend needs: the memory check for its KV cache and the position
embeddings of the image blocks."""

from __future__ import annotations

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


def ensure_cache_fits(need: int, have: int, rows: int, max_len: int, device) -> None:
    """Refuse, before allocating, a KV cache that would not fit in ``have`` bytes."""
    if need > 0.9 * have:
        raise ResourceError(
            f"the KV cache for {rows} sequences of {max_len} tokens needs {need / 2**30:.1f} "
            f"GiB but only {have / 2**30:.1f} GiB is free on {device}; generate fewer "
            "images at once (--num-images) or a smaller size")


def block_posembs(spec, h: int, w: int, device) -> torch.Tensor:
    """``[h*w/P + 1, P, H]``: each block's 2-D position embedding, plus one zero block so that
    block k + 1 exists for every k (graphs index it)."""
    p, hidden = spec.parallel_num, spec.llm.hidden_size
    pe = image_posemb(hidden, h, w, spec.patch).view(-1, p, hidden)
    return torch.cat([pe, torch.zeros(1, p, hidden)]).to(device)
