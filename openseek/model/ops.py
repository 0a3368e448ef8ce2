"""Kernels: the one dispatch between the model's math and its fast paths, each fast path beside its reference.

A forward's entry point picks one kernel set and passes it down: the dense forward (training, parity tests) runs
TRAINING, the paged forward the batch's set (INFERENCE unless the engine names another: COMPILED for decode steps
under torch.compile). Modules call `kernels.linear`, `.rms_norm`, `.attention`, `.routed_experts`, `.rope` and
never inspect grad mode, dtype or device: that happens here. A weight is a tensor or a QuantizedWeight (quant.py): every `linear` and `routed_experts` takes both,
the reference and training ones by dequantising, INFERENCE's through the weight-only CPU kernels (PyTorch's, and
openseek's int4 one where cpu_kernels.py built it).

Shapes: B batch, H heads, S query tokens, T key tokens, N tokens (flattened), D model dim, F expert hidden dim,
E routed experts, K experts per token, M (token, expert) rows of the grouped GEMMs, padding included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .quant import QuantizedParts, QuantizedWeight

Tensor = torch.Tensor

FLASH_MIN_LEN = 256  # from this many keys on, pad head dims equal so SDPA takes its flash kernel
PAD_TO = 64  # training pads each expert's rows to a multiple of this: few distinct GEMM shapes
# From this many rows on a quantised linear dequantises and runs a GEMM: the packed kernels' time grows with the
# rows (2 threads, a 1408x2048 int8 weight: 0.15 ms at 1 row, 4.6 ms at 64, dequantise + GEMM 6.2 ms at 64).
PACKED_MAX_ROWS = 128


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs x's matmuls in on x's device; None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


# ---- linear: x W^T --------------------------------------------------------------------------------------------

def dense(weight: Tensor | QuantizedWeight) -> Tensor:
    """The weight as a float tensor: a quantised one dequantised to the float dtype it stands for."""
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def linear_dense(x: Tensor, weight: Tensor | QuantizedWeight) -> Tensor:
    """F.linear; a quantised weight dequantised first (the reference every quantised kernel is tested against)."""
    return F.linear(x, dense(weight))


def linear_quantized(x: Tensor, weight: QuantizedWeight, index: int | None = None) -> Tensor:
    """x W^T for matrix `index` of a quantised weight: the packed CPU kernels for few rows, on the activation
    dtype they take (QuantizedMath.kernel_dtype); many rows, or another device, dequantise and run a GEMM in x's
    dtype."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows >= PACKED_MAX_ROWS or autocast_dtype(x) is not None:
        return F.linear(x, weight.dequantize(index, x.dtype))
    # contiguous: the kernels refuse a strided A, which a bf16 model's split latents are (no cast to copy them)
    y = weight.matmul_packed(x.reshape(rows, -1).to(weight.kernel_dtype).contiguous(), index)  # (rows, O)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def linear_inference(x: Tensor, weight: Tensor | QuantizedWeight) -> Tensor:
    """INFERENCE's linear: a quantised weight through its kernels, a float one as linear_one_row_mv."""
    if isinstance(weight, QuantizedWeight):
        return linear_quantized(x, weight)
    return linear_one_row_mv(x, weight)


def linear_one_row_mv(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear, but one bf16/fp16 row on CPU runs as torch.mv: oneDNN's GEMM reads the weights slower for one
    row, the shape of every projection in batch-1 decode."""
    if x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" \
            and autocast_dtype(x) is None:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def linear_compiled(x: Tensor, weight: Tensor | QuantizedWeight) -> Tensor:
    """COMPILED's linear: one row as a multiply-and-sum that inductor turns into one loop reading each weight once,
    upcasts and int8 dequantisation fused into it, at two to four times the read rate of MKL's and oneDNN's GEMMs
    on a single row (bench/results/compiled_gemv.txt); more rows, or int4 weights, as linear_inference."""
    if x.numel() != x.shape[-1] or (isinstance(weight, QuantizedWeight) and weight.scheme != "int8"):
        return linear_inference(x, weight)
    x_1I = x.reshape(1, -1).float()
    if isinstance(weight, QuantizedWeight):
        y = (weight.qweight.float() * x_1I).sum(-1) * weight.scale.float()  # (O,)
    else:
        y = (weight.float() * x_1I).sum(-1)  # (O,)
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def head_bmm(x_HMK: Tensor, w_HKN: Tensor, int8: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The per-head matmul of MLA's absorbed W_UK and W_UV^T: torch.bmm on the float weight (int8 is for
    head_bmm_compiled)."""
    return torch.bmm(x_HMK, w_HKN)


def head_bmm_inference(x_HMK: Tensor, w_HKN: Tensor, int8: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """INFERENCE's head_bmm: a quantised model's few rows through openseek's int8_head_mm on the int values (a
    quarter of float32's bytes; cpu_kernels.py), where it is built; else torch.bmm on the float weight."""
    if int8 is None or not cpu_kernels.loaded() or x_HMK.device.type != "cpu" or x_HMK.shape[1] >= PACKED_MAX_ROWS \
            or autocast_dtype(x_HMK) is not None:
        return torch.bmm(x_HMK, w_HKN)
    q_HNK, scale = int8  # scale (H, Gn, Gk): one per block of N / Gn rows and K / Gk columns
    (H, N, K), (Gn, Gk) = q_HNK.shape, scale.shape[1:]
    x = x_HMK.float()[:, :, None]  # (H, M, 1, K)
    if Gk == K:  # the scale varies along the summed dim (W_UK^T): fold it into x, one x per block of rows
        x, scale = x * scale[:, None], scale.new_ones(H, N, 1)  # (H, M, Gn, K), (H, N, 1)
    elif Gn != N:
        scale = scale.repeat_interleave(N // Gn, 1)  # (H, N, Gk)
    return torch.ops.openseek_cpu.int8_head_mm(x, q_HNK, scale).to(x_HMK.dtype)  # (H, M, N)


def head_bmm_compiled(x_HMK: Tensor, w_HKN: Tensor, int8: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """COMPILED's head_bmm: one row per head as a multiply-and-sum, read in place as linear_compiled reads its
    weight; more rows as torch.bmm. int8: the same weight as a quantised model's int values stored (H, N, K) and
    float scales (H, Gn, Gk), one per block of N / Gn rows and K / Gk columns (mla.MLA._absorb_int8), read for
    one row instead of the float copy: a quarter of its bytes."""
    if x_HMK.shape[1] != 1:
        return torch.bmm(x_HMK, w_HKN)
    if int8 is None:
        return (x_HMK.transpose(1, 2).float() * w_HKN.float()).sum(1, keepdim=True).to(x_HMK.dtype)  # (H, 1, N)
    q_HNK, scale = int8  # scale (H, Gn, Gk)
    (H, N, K), (Gn, Gk) = q_HNK.shape, scale.shape[1:]
    x = x_HMK.float().view(H, 1, 1, Gk, K // Gk)
    # each block's int sums, then its scale: (H, Gn, N / Gn, Gk) partial sums
    partial = (x * q_HNK.view(H, Gn, N // Gn, Gk, K // Gk).float()).sum(-1)
    return (partial * scale.view(H, Gn, 1, Gk)).sum(-1).view(H, 1, N).to(x_HMK.dtype)  # (H, 1, N)


# ---- RMSNorm: weight * x / rms(x) ----------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The reference: statistics in float32 (bf16 overflows otherwise), the weight after the cast back."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def rms_norm_inference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm in five plain ops, bit-identical to it (tested): F.rms_norm runs the same ops on CPU as a
    composite, plus two no-op casts in float32; a decode step makes three norms a layer on single rows."""
    if x.dtype == torch.float32:  # the casts would be no-ops, each still a dispatch
        return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)))
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))).to(x.dtype)


def rms_norm_training(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm with a hand-written backward, emitting autocast's dtype: a norm feeds matmuls, one cast here."""
    return _RMSNormFunction.apply(x, weight, eps, autocast_dtype(x))


class _RMSNormFunction(torch.autograd.Function):
    """F.rms_norm's autograd on CPU is a chain of ~20 elementwise passes over the activations; this is 9."""

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


# ---- attention: softmax(q k^T * scale) v over (B, H, S or T, head dim) ------------------------------------------

def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Scores written out; causal (queries last in the keys) when mask is None."""
    S, T = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)  # (S, T)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, S, T)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA; over long contexts the narrower of the q/k and v head dims is zero-padded (which changes no score
    and no output column): PyTorch's CPU flash kernel needs them equal, and its math fallback writes all scores."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if k.shape[-2] >= FLASH_MIN_LEN and qk_dim != v_dim:
        if v_dim < qk_dim:
            v = F.pad(v, (0, qk_dim - v_dim))
        else:
            q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[..., :v_dim]


# ---- routed experts: sum over k of weights_NK[n, k] * SwiGLU_{ids_NK[n, k]}(x_n) ------------------------------

def swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, linear: Callable[[Tensor, Tensor], Tensor] = F.linear,
           gate: Tensor | None = None) -> Tensor:
    """w2 (silu(w1 x) * w3 x) on raw weights, each row's hidden optionally scaled by gate (rows,): a routed
    expert's weight scales its (rows, F) hidden rather than its (rows, D) output, the same product in fewer bytes."""
    h = F.silu(linear(x, w1)) * linear(x, w3)
    return linear(h if gate is None else h * gate[:, None].to(h.dtype), w2)


def experts_reference(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """Each expert on the tokens that chose it, one expert at a time."""
    w1, w2, w3 = dense(w1), dense(w2), dense(w3)
    y_ND = torch.zeros_like(x_ND)
    for e in ids_NK.unique().tolist():
        n, k = (ids_NK == e).nonzero(as_tuple=True)
        y = swiglu(x_ND[n], w1[e], w2[e], w3[e]) * weights_NK[n, k, None].to(x_ND.dtype)
        y_ND = y_ND.index_add(0, n, y)
    return y_ND


def experts_padded(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """Training: a GEMM per expert over its pairs padded to a multiple of PAD_TO rows.

    grouped_mm has no backward on CPU (torch 2.13). oneDNN, which runs bf16 GEMMs there, compiles a kernel
    for every new shape, and per-expert token counts change every step; padded counts repeat.
    """
    w1, w2, w3 = dense(w1), dense(w2), dense(w3)
    N, K = ids_NK.shape
    ids = ids_NK.flatten()
    order = ids.argsort(stable=True)  # (N*K,) pairs sorted by expert
    counts_E = torch.bincount(ids, minlength=w1.shape[0])
    padded_E = (counts_E + PAD_TO - 1) // PAD_TO * PAD_TO
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)  # padding before each group
    slot = torch.arange(N * K, device=ids.device) + shift_E[ids[order]]  # (N*K,) row of each sorted pair
    # padding rows read token 0 and carry gate weight 0, so they add nothing, forward or backward
    token_M = ids.new_zeros(int(padded_E.sum())).index_copy_(0, slot, order // K)
    gate_M = weights_NK.new_zeros(len(token_M)).index_copy(0, slot, weights_NK.flatten()[order])
    # cast once, not per expert (under autocast), and before the gather, which then moves half the bytes;
    # unbind once: indexing w[e] per expert would give each its own full-size (E, ...) gradient buffer
    dtype = autocast_dtype(x_ND) or x_ND.dtype
    w1_E, w2_E, w3_E = (w.to(dtype).unbind(0) for w in (w1, w2, w3))
    xs_MD = x_ND.to(dtype).index_select(0, token_M)
    # split, not slicing: a slice's backward zero-fills a copy of all of xs per expert; split's concatenates
    groups = zip(xs_MD.split(padded_E.tolist()), gate_M.split(padded_E.tolist()))
    ys = [swiglu(xe, w1_E[e], w2_E[e], w3_E[e], gate=ge) for e, (xe, ge) in enumerate(groups) if len(xe)]
    # no pairs: xs_MD is (0, D) and still in x's graph, which expert parallelism's backward all_to_all needs
    ys_MD = torch.cat(ys) if ys else xs_MD
    return torch.zeros_like(x_ND).index_add_(0, token_M, ys_MD.to(x_ND.dtype))


def experts_inference(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """Group (token, slot) pairs by expert and run only the experts that received tokens."""
    if isinstance(w1, QuantizedWeight):
        return experts_quantized(w1, w2, w3, x_ND, weights_NK, ids_NK)
    N, K = ids_NK.shape
    if N == 1:  # batch-1 decode: the K experts straight on the token, no sort or scatter
        ys_KD = torch.cat([swiglu(x_ND, w1[e], w2[e], w3[e], linear_one_row_mv) for e in ids_NK[0].tolist()])
        return _cast(torch.mm(_cast(weights_NK, ys_KD.dtype), ys_KD), x_ND.dtype)  # (1, D)
    if _use_grouped_mm(N * K, w1.shape[0]):
        return experts_grouped_mm(w1, w2, w3, x_ND, weights_NK, ids_NK)
    order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs sorted by expert
    counts_E = torch.bincount(ids_NK.flatten(), minlength=w1.shape[0])
    token_of = order // K
    xs_MD = x_ND[token_of]  # grouped by expert
    # grouped_mm visits every expert, empty or not: for a few tokens a loop over the hit ones is cheaper
    ys_MD = torch.cat([swiglu(xe, w1[e], w2[e], w3[e], linear_one_row_mv)
                       for e, xe in enumerate(xs_MD.split(counts_E.tolist())) if len(xe)])
    ys_MD = ys_MD * weights_NK.flatten()[order, None].to(ys_MD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_of, ys_MD.to(x_ND.dtype))


def _use_grouped_mm(pairs: int, n_experts: int) -> bool:
    return hasattr(torch, "_grouped_mm") and pairs >= n_experts


def experts_grouped_mm(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor
                       ) -> Tensor:
    """One grouped GEMM per projection over the (token, expert) pairs sorted by expert: no per-expert Python."""
    K = ids_NK.shape[1]
    order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs sorted by expert
    offs = torch.bincount(ids_NK.flatten(), minlength=w1.shape[0]).cumsum(0).to(torch.int32)  # (E,)
    token_of = order // K
    xs_MD = x_ND[token_of]  # grouped by expert
    h_MF = F.silu(torch._grouped_mm(xs_MD, w1.transpose(1, 2), offs=offs)) \
        * torch._grouped_mm(xs_MD, w3.transpose(1, 2), offs=offs)
    ys_MD = torch._grouped_mm(h_MF, w2.transpose(1, 2), offs=offs)
    ys_MD = ys_MD * weights_NK.flatten()[order, None].to(ys_MD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_of, ys_MD.to(x_ND.dtype))


def experts_gathered(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor
                     ) -> Tensor:
    """COMPILED's experts, with no data-dependent shape or Python (what a compiled graph needs): each (token,
    expert) pair's weights gathered and run as a batch of GEMVs. The gather copies N * K experts' weights, small
    beside per-op dispatch on a small model's experts (the case compile is for), not on a large one's. Float
    weights (quantised ones go to experts_quantized_op)."""
    N, K = ids_NK.shape
    ids_M = ids_NK.flatten()  # (M = N*K,)
    xs_M1D = x_ND[:, None].expand(N, K, -1).reshape(N * K, 1, -1)  # (M, 1, D)
    h_M1F = F.silu(torch.bmm(xs_M1D, w1[ids_M].transpose(1, 2))) * torch.bmm(xs_M1D, w3[ids_M].transpose(1, 2))
    ys_NKD = torch.bmm(h_M1F, w2[ids_M].transpose(1, 2)).view(N, K, -1)  # (N, K, D)
    return (ys_NKD * weights_NK[..., None].to(ys_NKD.dtype)).sum(1).to(x_ND.dtype)  # (N, D)


def experts_compiled(w1: Tensor, w2: Tensor, w3: Tensor, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor
                     ) -> Tensor:
    """COMPILED's experts: for one token, its K experts as multiply-and-sums over the stacks indexed by expert,
    which inductor reads in place (no gathered copy), int8 dequantisation fused; more tokens as experts_gathered;
    int4 on openseek's kernel as its indexed calls, in the graph; other quantised cases (int8 at batch > 1, int4 on
    PyTorch's kernel) as experts_quantized_op."""
    quantized = isinstance(w1, QuantizedWeight)
    if quantized and _int4_indexed(w1, x_ND, ids_NK):  # no Python per expert: traced as it is
        return _experts_int4_indexed(w1, w2, w3, x_ND, weights_NK, ids_NK)
    if quantized and (ids_NK.shape[0] != 1 or w1.scheme != "int8"):
        return experts_quantized_op(w1, w2, w3, x_ND, weights_NK, ids_NK)
    if ids_NK.shape[0] != 1:
        return experts_gathered(w1, w2, w3, x_ND, weights_NK, ids_NK)
    ids_K = ids_NK[0]

    def rows(w: Tensor | QuantizedWeight, v_KI: Tensor) -> Tensor:  # (K, O): expert k's W v_k
        if quantized:
            return (w.qweight[ids_K].float() * v_KI[:, None]).sum(-1) * w.scale[ids_K].float()
        return (w[ids_K].float() * v_KI[:, None]).sum(-1)

    x_KD = x_ND.float().expand(len(ids_K), -1)  # (K, D)
    h_KF = F.silu(rows(w1, x_KD)) * rows(w3, x_KD) * weights_NK[0, :, None].float()
    return rows(w2, h_KF).sum(0, keepdim=True).to(x_ND.dtype)  # (1, D)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x.to(dtype) without the dispatch when it would be a no-op (several per layer of a decode step)."""
    return x if x.dtype == dtype else x.to(dtype)


def experts_quantized(w1: QuantizedWeight, w2: QuantizedWeight, w3: QuantizedWeight, x_ND: Tensor,
                      weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """experts_inference on quantised stacks: a loop over the experts that received tokens, never all E (a decode
    step touches K of them), each expert's rows through linear_quantized."""
    def expert(x: Tensor, e: int, gate: Tensor | None = None) -> Tensor:
        return swiglu(x, w1, w2, w3, lambda x, w: linear_quantized(x, w, e), gate)

    N, K = ids_NK.shape
    if _int4_indexed(w1, x_ND, ids_NK):
        return _experts_int4_indexed(w1, w2, w3, x_ND, weights_NK, ids_NK)
    if N == 1 and x_ND.device.type == "cpu" and autocast_dtype(x_ND) is None:
        return _experts_packed_one_token(w1, w2, w3, x_ND, weights_NK, ids_NK)
    if N == 1:
        ys_KD = torch.cat([expert(x_ND, e) for e in ids_NK[0].tolist()])
        return torch.mm(weights_NK.to(ys_KD.dtype), ys_KD).to(x_ND.dtype)  # (1, D)
    order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs sorted by expert
    counts_E = torch.bincount(ids_NK.flatten(), minlength=w1.shape[0])
    token_of, gate_M = order // K, weights_NK.flatten()[order]
    groups = zip(x_ND[token_of].split(counts_E.tolist()), gate_M.split(counts_E.tolist()))
    ys_MD = torch.cat([expert(xe, e, ge) for e, (xe, ge) in enumerate(groups) if len(xe)])
    return torch.zeros_like(x_ND).index_add_(0, token_of, ys_MD.to(x_ND.dtype))


def _experts_packed_one_token(w1: QuantizedWeight, w2: QuantizedWeight, w3: QuantizedWeight, x_ND: Tensor,
                              weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """experts_quantized's batch-1 decode straight on the packed kernels: the same values as its loop through
    linear_quantized, with the cast of x made once and no per-call checks (half its time was dispatch)."""
    dtype, x_1D = x_ND.dtype, x_ND.to(w1.kernel_dtype).contiguous()
    ys = []
    for e in ids_NK[0].tolist():
        h_1F = F.silu(w1.matmul_packed(x_1D, e).to(dtype)) * w3.matmul_packed(x_1D, e).to(dtype)
        ys.append(w2.matmul_packed(h_1F.to(w2.kernel_dtype), e))
    return torch.mm(weights_NK.to(dtype), torch.cat(ys).to(dtype)).to(dtype)  # (1, D)


def _int4_indexed(w1: QuantizedWeight, x_ND: Tensor, ids_NK: Tensor) -> bool:
    """Whether quantised experts run as _experts_int4_indexed: int4 on CPU where openseek's kernel is built, few
    pairs (each reads its expert's weights once)."""
    return w1.scheme == "int4" and cpu_kernels.loaded() and x_ND.device.type == "cpu" \
        and autocast_dtype(x_ND) is None and ids_NK.numel() < PACKED_MAX_ROWS


def _experts_int4_indexed(w1: QuantizedWeight, w2: QuantizedWeight, w3: QuantizedWeight, x_ND: Tensor,
                          weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """experts_quantized on int4 stacks for few tokens: every (token, expert) pair's rows in three calls of
    openseek's indexed kernel (cpu_kernels.py), float32 throughout, no Python per expert."""
    N, K = ids_NK.shape
    ids_M = ids_NK.flatten()  # (M = N*K,)
    x_MD = x_ND.float().repeat_interleave(K, 0)  # each token once per expert it chose
    h_MF = F.silu(w1.matmul_indexed(x_MD, ids_M)) * w3.matmul_indexed(x_MD, ids_M)
    ys_NKD = w2.matmul_indexed(h_MF, ids_M).view(N, K, -1)
    return (ys_NKD * weights_NK[..., None].float()).sum(1).to(x_ND.dtype)  # (N, D)


@torch.library.custom_op("openseek::experts_quantized", mutates_args=())
def _experts_quantized_parts(x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor, qweights: list[Tensor],
                             scales: list[Tensor], scheme: str, group_size: int, shapes: list[int]) -> Tensor:
    """experts_quantized on w1, w2, w3 given as their tensors (a custom op takes no modules); shapes: the three
    stacks' (E, O, I), flattened; group_size 0 for int8."""
    w1, w2, w3 = (QuantizedParts(scheme, tuple(shapes[3 * j: 3 * j + 3]), group_size or None, x_ND.dtype, q, s)
                  for j, (q, s) in enumerate(zip(qweights, scales)))
    return experts_quantized(w1, w2, w3, x_ND, weights_NK, ids_NK)


@_experts_quantized_parts.register_fake
def _(x_ND: Tensor, *args) -> Tensor:
    return torch.empty_like(x_ND)


def experts_quantized_op(w1: QuantizedWeight, w2: QuantizedWeight, w3: QuantizedWeight, x_ND: Tensor,
                         weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
    """experts_quantized as one custom op, which torch.compile calls as it is: traced, its loop over the experts
    that received tokens (a .tolist()) would break the graph at every MoE layer."""
    ws = (w1, w2, w3)
    return torch.ops.openseek.experts_quantized(x_ND, weights_NK, ids_NK, [w.qweight for w in ws],
                                                [w.scale for w in ws], w1.scheme, w1.group_size or 0,
                                                [d for w in ws for d in w.shape])


# ---- RoPE: rotate adjacent pairs (x[2k], x[2k+1]) by e^(i theta) ------------------------------------------------

def rope_pairs(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """layers.apply_rope in real arithmetic, bit-identical to its complex product on CPU (tested): torch.compile
    traces no view_as_complex of a strided tensor. x: (B, S, ..., R); freqs_cis: (B, S, R/2) complex."""
    if x.dim() > 3:
        freqs_cis = freqs_cis.view(freqs_cis.shape[:2] + (1,) * (x.dim() - 3) + freqs_cis.shape[2:])
    cos, sin = freqs_cis.real, freqs_cis.imag  # (B, S, ..., R/2)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., R/2) each
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


# ---- the kernel sets -------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Kernels:
    """The functions the model's math calls for its heavy operations."""

    linear: Callable[[Tensor, Tensor], Tensor]  # (x, weight) -> x W^T
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]  # (x, weight, eps)
    attention: Callable[[Tensor, Tensor, Tensor, Tensor | None, float], Tensor]  # (q, k, v, mask, scale)
    # (w1, w2, w3, x_ND, weights_NK, ids_NK); the experts stacked: w1, w3 (E, F, D), w2 (E, D, F)
    routed_experts: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    dense: Callable[[Tensor], Tensor] = dense  # a stored weight as a float tensor (MLA derives W_UK / W_UV from it)
    # (H, M, K) @ (H, K, N), optionally also given as int values and scales: MLA's absorbed W_UK, W_UV^T
    head_bmm: Callable[[Tensor, Tensor, tuple[Tensor, Tensor] | None], Tensor] = head_bmm
    rope: Callable[[Tensor, Tensor], Tensor] | None = None  # (x, freqs_cis); None: layers.apply_rope


REFERENCE = Kernels(linear_dense, rms_norm, attention_reference, experts_reference)
TRAINING = Kernels(linear_dense, rms_norm_training, attention_sdpa, experts_padded)
INFERENCE = Kernels(linear_inference, rms_norm_inference, attention_sdpa, experts_inference,
                    head_bmm=head_bmm_inference)
# the decode step under torch.compile (the engine's `compile`): the same math, traceable without graph breaks
COMPILED = Kernels(linear_compiled, rms_norm_inference, attention_sdpa, experts_compiled, rope=rope_pairs,
                   head_bmm=head_bmm_compiled)
