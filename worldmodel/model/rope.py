"""Rotary positions over (time, row, column) for the world model's transformer
(worldmodel/model/transformer.py) and its KV cache (worldmodel/model/kv_cache.py)."""
from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to time, rows and columns (a quarter to time, the rest shared)."""
    pairs = head_dim // 2
    t = max(1, pairs // 4)
    r = (pairs - t) // 2
    return t, r, pairs - t - r


def rope_freqs(n: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(n, dtype=torch.float32) / max(n, 1))


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """angles (L, D/2) -> cos, sin (L, D): the tables `apply_rope` takes, the sign of the rotation folded
    into sin, so that rotating is one multiply and one multiply-add."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos, sin: (L, D) from `rope_tables`. Rotates pairs (i, i + D/2):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * sin, computed in float32 for a
    lower-precision x (rounded once, as training computes it) and returned in x's dtype."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat((x2, x1), dim=-1), sin).to(x.dtype)
