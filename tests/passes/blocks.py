"""Small models for graph-diff tests: few enough nodes to read a golden rendering."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionBlock(nn.Module):
    """An embedder (to exclude), q/k/v from one norm, attention, output proj, GELU MLP."""

    def __init__(self, dim: int = 32, heads: int = 2, cond: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(cond, dim)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.ff_in = nn.Linear(dim, 2 * dim)
        self.ff_out = nn.Linear(2 * dim, dim)

    def forward(self, hidden_states: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = hidden_states + self.embed(cond)[:, None]
        h = self.norm(x)
        b, t, d = h.shape
        q, k, v = (
            proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.to_out(a)
        return x + self.ff_out(F.gelu(self.ff_in(x)))


def block_inputs(batch: int = 2, tokens: int = 5) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(batch, tokens, 32), "cond": torch.randn(batch, 8)}
