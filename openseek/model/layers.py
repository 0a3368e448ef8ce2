"""RMSNorm, SwiGLU, and rotary embeddings with YaRN in the checkpoint's interleaved layout.

Shapes: B batch, S tokens, D model dim, F hidden dim of an FFN, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype (bf16 overflows/underflows otherwise).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); w1 = gate, w3 = up, w2 = down (DeepSeek's names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) with YaRN's blend applied, and the cos/sin multiplier."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (R/2,)
    ys = cfg.rope_scaling
    if not ys:
        return inv_freq, 1.0
    factor, orig_len = ys["factor"], ys["original_max_position_embeddings"]
    beta_fast, beta_slow = ys.get("beta_fast") or 32, ys.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    # Shipped configs set mscale == mscale_all_dim, so this is 1.0; the softmax carries mscale^2 instead.
    attn_factor = ys.get("attention_factor") or \
        yarn_mscale(factor, ys.get("mscale") or 1.0) / yarn_mscale(factor, ys.get("mscale_all_dim") or 0.0)
    return inv_freq, attn_factor


class Rotary(nn.Module):
    """cos/sin for given positions; shared by every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # (..., R/2)
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) by angle k: the checkpoint's interleaved layout, kept on output.

    x: (B, S, ..., R); cos, sin: (B, S, R/2) broadcast over the middle dims.
    """
    shape = cos.shape[:2] + (1,) * (x.dim() - 3) + cos.shape[2:]
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float().unflatten(-1, (-1, 2))  # (..., R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
