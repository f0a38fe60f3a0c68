"""Matrix products whose rows do not depend on the batch: the one ``Linear`` of every model.

A float32 matrix product on the CPU rounds a row the same way only when the math library runs
the same kernel for it, and the library picks its kernel (and its split of the work) from the
shape: oneMKL computes products of 1 to 3 rows with another kernel than larger ones, even in its
strict reproducibility mode, on AMD and Intel processors alike. The reference runs the
conditional and unconditional rows in separate calls and the time embedding one row per image;
the runtime batches them. So that every backend, every batching and every request alone give the
same bits, a CPU float32 product here is always computed in tiles of exactly :data:`ROW_TILE`
rows (the last tile padded with zeros): every product of a layer then has one shape, one kernel
and one reduction order for each row, whatever the number of rows, on any processor.

Elsewhere (CUDA, lower precisions, graph export) the product is the plain
``F.linear``: no bit-for-bit claim is made there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows per product on the CPU in float32. A multiple of every register block the math libraries
# use for float32 (4, 6, 8, 16 rows), so no row falls in a partial block.
ROW_TILE = 48


def _exact_rows(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    # a graph export sees the plain product (torch.compile traces the tiles)
    return not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
                or torch.jit.is_tracing())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear``, row for row independent of how many rows are computed together on the CPU
    in float32 (see the module's docstring)."""
    if not _exact_rows(x) or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if m == 0:
        return F.linear(x, weight, bias)
    pad = -m % ROW_TILE
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    if m + pad == ROW_TILE:
        out = F.linear(rows, weight, bias)
    else:
        out = torch.cat([F.linear(t, weight, bias) for t in rows.split(ROW_TILE)])
    return out[:m].reshape(*lead, weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
