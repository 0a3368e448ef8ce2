"""RMSNorm, SwiGLU, and rotary embeddings with YaRN in the checkpoint's interleaved layout.

Shapes: B batch, S tokens, D model dim, F hidden dim of an FFN, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs x's matmuls in on x's device; None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias. One bf16/fp16 row on CPU runs as torch.mv: oneDNN's GEMM, which runs those dtypes,
    reads the weights 1.5-3.5x slower than mv at M=1, the shape of every projection in batch-1 decode."""
    if x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" \
            and autocast_dtype(x) is None:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear through linear(); its parameter is `weight`, as the checkpoints name it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # a norm feeds matmuls: under autocast it emits their dtype, one cast here instead of one per consumer
            return _RMSNormFunction.apply(x, self.weight, self.eps, autocast_dtype(x))
        # Statistics in float32 whatever the activation dtype (bf16 overflows/underflows otherwise); the weight
        # multiplies after the cast back, as the reference does. One op instead of six: decode runs ~25 per token.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm.forward's formula with a hand-written backward: F.rms_norm's autograd on CPU is a chain of ~20
    elementwise passes over the activations, this is 9 (half the time of a norm's forward + backward)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        rstd = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        y = weight * (xf * rstd).to(x.dtype)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat, grad = x.float() * rstd, grad.float()
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        grad_x_hat = grad * weight
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g the gradient at x_hat
        mean = (grad_x_hat * x_hat).mean(-1, keepdim=True)
        grad_x = grad_x_hat.sub_(x_hat.mul_(mean)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); w1 = gate, w3 = up, w2 = down (DeepSeek's names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(hidden, dim)
        self.w3 = Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # the modules, so that swapping or hooking them works


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
           gate: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU on raw weights (routed experts are stacked tensors, not modules): w2 (silu(w1 x) * w3 x), each row's
    hidden optionally scaled by gate (rows,): a routed expert's weight scales its (rows, F) hidden rather than its
    (rows, D) output, the same product in fewer bytes."""
    h = F.silu(linear(x, w1)) * linear(x, w3)
    return linear(h if gate is None else h * gate[:, None].to(h.dtype), w2)


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
    freqs_cis = freqs_cis.view(freqs_cis.shape[:2] + (1,) * (x.dim() - 3) + freqs_cis.shape[2:])
    xf = x.float()
    if xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):  # view_as_complex needs pairs aligned
        xf = xf.contiguous()
    x_c = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., R/2)
    return torch.view_as_real(x_c * freqs_cis).flatten(-2).to(x.dtype)
