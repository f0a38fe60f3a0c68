"""The projector from binary tokens ``[B, P, 32]`` to LLM input embeddings ``[B, P, H]``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .linear import Linear


class Projector(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``; keys ``fc1.*``, ``fc2.*`` as in ``projector.safetensors``."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(in_dim, hidden)
        self.fc2 = Linear(hidden, hidden)

    def forward(self, tokens):
        return self.fc2(F.gelu(self.fc1(tokens), approximate="tanh"))
