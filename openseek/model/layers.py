"""Linear, RMSNorm, SwiGLU, and rotary embeddings with YaRN in the checkpoint's interleaved layout.

A module's heavy operation is its kernel set's (ops.py); called without one, it runs TRAINING's.
Shapes: B batch, S tokens, D model dim, F hidden dim of an FFN, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from .ops import TRAINING, Kernels


class Linear(nn.Linear):
    """A bias-free nn.Linear through the kernel set's linear; its parameter is `weight`, as checkpoints name it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, kernels: Kernels = TRAINING) -> torch.Tensor:
        return kernels.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, kernels: Kernels = TRAINING) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); w1 = gate, w3 = up, w2 = down (DeepSeek's names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(hidden, dim)
        self.w3 = Linear(dim, hidden)

    def forward(self, x: torch.Tensor, kernels: Kernels = TRAINING) -> torch.Tensor:
        # the modules, so that swapping or hooking them works
        return self.w2(F.silu(self.w1(x, kernels)) * self.w3(x, kernels), kernels)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) with YaRN's blend applied, and the rotations' magnitude (attention factor)."""
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
    """Rotations e^(i * position * theta_k), times YaRN's attention factor, for given positions; shared by every
    layer (DeepSeek-V3's `freqs_cis`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float()[..., None] * self.inv_freq  # (..., R/2)
        return torch.polar(torch.full_like(angles, self.attn_factor), angles)  # (..., R/2) complex64


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) as complex numbers: the checkpoint's interleaved layout, kept on output.

    x: (B, S, ..., R); freqs_cis: (B, S, R/2) complex, broadcast over the middle dims.
    """
    if x.dim() > 3:
        freqs_cis = freqs_cis.view(freqs_cis.shape[:2] + (1,) * (x.dim() - 3) + freqs_cis.shape[2:])
    # a decode step ropes two single rows per layer: casts that would be no-ops are skipped, not dispatched
    xf = x if x.dtype == torch.float32 else x.float()
    if xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):  # view_as_complex needs pairs aligned
        xf = xf.contiguous()
    x_c = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., R/2)
    out = torch.view_as_real(x_c * freqs_cis).flatten(-2)  # (..., R) float32
    return out if x.dtype == torch.float32 else out.to(x.dtype)
