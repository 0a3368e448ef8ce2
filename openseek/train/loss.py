"""The LM loss fused with the output head: cross-entropy of h @ W^T without the (N, V) logits.

Shapes: N tokens (in `_forward`, the `_chunk` names hold a chunk's rows of them), D model dim, V vocabulary.

Chunks of tokens compute their logits, loss and gradients in the forward pass (as Liger Kernel's fused linear
cross-entropy does), so the full logits, their float32 copy, log-softmax and its gradient are never written out:
on CPU those passes over N x V floats cost more than the head's GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.ops import autocast_dtype

IGNORE_INDEX = -100  # F.cross_entropy's default


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean of F.cross_entropy(h_ND @ w_VD.T, targets_N) over targets not IGNORE_INDEX (NaN if none)."""
    dtype = autocast_dtype(h_ND) or h_ND.dtype
    with torch.autocast(h_ND.device.type, enabled=False):
        if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
            return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, dtype)
        return _forward(h_ND.to(dtype), w_VD.to(dtype), targets_N, with_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, dtype):
        loss, grad_h, grad_w = _forward(h_ND.to(dtype), w_VD.to(dtype), targets_N, with_grads=True)
        ctx.save_for_backward(grad_h.to(h_ND.dtype), grad_w.to(w_VD.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def _forward(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, with_grads: bool):
    """(mean loss, d loss / d h, d loss / d w in float32), chunk by chunk; gradients only when with_grads."""
    N, V = targets_N.numel(), w_VD.shape[0]
    targets_N = targets_N.flatten()
    valid_N = targets_N != IGNORE_INDEX
    n_valid = valid_N.sum()
    total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    grad_h = torch.empty_like(h_ND) if with_grads else None
    grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if with_grads else None
    # Liger's rule: ceil(V / D) chunks, so a chunk's logits are about as big as h and stay in cache
    chunk = -(-N // -(-V // h_ND.shape[1]))
    for s in range(0, N, chunk):
        h_chunk, t_chunk, valid_chunk = h_ND[s:s + chunk], targets_N[s:s + chunk], valid_N[s:s + chunk]
        t_chunk = t_chunk.masked_fill(~valid_chunk, 0)
        logp_chunk = torch.log_softmax(F.linear(h_chunk, w_VD), -1, dtype=torch.float32)  # one pass, cast included
        total -= (logp_chunk.gather(1, t_chunk[:, None])[:, 0] * valid_chunk).sum()
        if with_grads:  # d loss / d logits = (softmax - one_hot(target)) / n_valid, zero for ignored rows
            g_chunk = logp_chunk.exp_()
            g_chunk.scatter_add_(1, t_chunk[:, None], g_chunk.new_full((len(t_chunk), 1), -1.0))
            g_chunk = g_chunk.to(h_ND.dtype)  # unscaled: the scale and the ignored rows apply to the (., D) results
            torch.mm(g_chunk, w_VD, out=grad_h[s:s + chunk])
            grad_w += torch.mm(g_chunk.T, h_chunk * valid_chunk[:, None])
    if with_grads:
        inv_n = 1 / n_valid.clamp(min=1)
        grad_h.mul_((valid_N * inv_n)[:, None])
        grad_w.mul_(inv_n)
    return total / n_valid, grad_h, grad_w
