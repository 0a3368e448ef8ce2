"""DeepSeekMoE: router, stacked routed experts, shared experts (DeepSeek-V2 §2.2, V3 §2.1.2).

Shapes: N tokens (batch and sequence flattened), D model dim, E routed experts, K experts per token,
F expert hidden dim, G expert groups. Suffixes name the dims where several coexist (`ids_NK`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import SwiGLU, autocast_dtype, swiglu

PAD_TO = 64  # training pads each expert's tokens to a multiple of this: few distinct GEMM shapes


class Router(nn.Module):
    """Scores in float32; top-k greedy, group-limited (V2) or noaux_tc with a selection bias (V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.n_devices, self.device_limit = 1, 1  # set by limit_devices(), from outside: not the architecture
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # V3's e_score_correction_bias: moved by the load-balancing rule, not by gradients.
        self.register_buffer("bias", torch.zeros(E) if self.method == "noaux_tc" else None)

    def limit_devices(self, n_devices: int, device_limit: int) -> None:
        """Route each token to experts on at most device_limit of n_devices contiguous expert blocks (training's
        device-/node-limited routing, V2 §2.2.2, V3 §2.1.2); limit_devices(1, 1) lifts the limit."""
        self.n_devices, self.device_limit = n_devices, device_limit

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> gate weights (N, K) float32, expert ids (N, K), full scores (N, E) float32."""
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.softmax(-1) if self.scoring == "softmax" else logits_NE.sigmoid()
        choice_NE = scores_NE if self.bias is None else scores_NE + self.bias.float()
        if self.method != "greedy" and self.n_group > 1:  # as HF's V3, noaux_tc groups score their top 2
            choice_NE = self._limit_groups(choice_NE, self.n_group, self.topk_group,
                                           2 if self.method == "noaux_tc" else 1)
        if self.device_limit < self.n_devices:  # V3's node limit: a node scores its top K/limit; V2's its best
            choice_NE = self._limit_groups(choice_NE, self.n_devices, self.device_limit,
                                           max(1, self.top_k // self.device_limit) if self.bias is not None else 1)
        ids_NK = choice_NE.topk(self.top_k, dim=-1).indices
        weights_NK = scores_NE.gather(1, ids_NK)  # the unbiased scores weight the experts
        if self.scoring == "sigmoid":  # V3: optional renormalisation, then always scaled
            if self.norm_topk_prob:
                weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
            weights_NK = weights_NK * self.scaling
        elif self.top_k > 1 and self.norm_topk_prob:  # V2 remote code: renormalise *instead of* scaling
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        else:
            weights_NK = weights_NK * self.scaling
        return weights_NK, ids_NK, scores_NE

    def _limit_groups(self, choice_NE: torch.Tensor, G: int, keep: int, per_group: int) -> torch.Tensor:
        """Keep the experts of the `keep` best of G groups, a group scored by the sum of its top per_group."""
        N, E = choice_NE.shape
        by_group = choice_NE.view(N, G, E // G)  # (N, G, E/G)
        group_NG = by_group.amax(-1) if per_group == 1 else by_group.topk(per_group, dim=-1).values.sum(-1)
        # V2's reference fills with 0 (softmax scores are > 0); biased scores may be negative
        fill = 0.0 if self.method == "group_limited_greedy" else float("-inf")
        keep_NG = torch.zeros_like(group_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_NG.topk(keep, dim=-1).indices, True)
        return by_group.masked_fill(~keep_NG[..., None], fill).view(N, E)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 (E, F, D), w2 (E, D, F)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        """Group (token, slot) pairs by expert and run only the experts that received tokens."""
        N, K = ids_NK.shape
        if torch.is_grad_enabled() and self.w1.requires_grad:
            return self._padded(x_ND, weights_NK, ids_NK)
        if N == 1:
            return self._one_token(x_ND, weights_NK, ids_NK)
        order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs sorted by expert
        counts_E = torch.bincount(ids_NK.flatten(), minlength=self.w1.shape[0])
        token_of = order // K
        xs = x_ND[token_of]  # (N*K, D), grouped by expert
        # grouped_mm visits every expert, empty or not: for a few tokens (decode) a loop over the hit ones is cheaper
        ys = self._grouped(xs, counts_E) if hasattr(torch, "_grouped_mm") and N * K >= len(counts_E) \
            else self._looped(xs, counts_E)
        ys = ys * weights_NK.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, ys.to(x_ND.dtype))

    def _one_token(self, x_1D: torch.Tensor, weights_1K: torch.Tensor, ids_1K: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: the K experts straight on the token, no sort or scatter (a third fewer ops per layer)."""
        ys_KD = torch.cat([swiglu(x_1D, self.w1[e], self.w2[e], self.w3[e]) for e in ids_1K[0].tolist()])
        return torch.mm(weights_1K.to(ys_KD.dtype), ys_KD).to(x_1D.dtype)  # (1, D)

    def _grouped(self, xs: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = counts_E.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(xs, self.w1.transpose(1, 2), offs=offs)) \
            * torch._grouped_mm(xs, self.w3.transpose(1, 2), offs=offs)  # (N*K, F)
        return torch._grouped_mm(h, self.w2.transpose(1, 2), offs=offs)  # (N*K, D)

    def _looped(self, xs: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        ys = [swiglu(xe, self.w1[e], self.w2[e], self.w3[e]) for e, xe in enumerate(xs.split(counts_E.tolist()))
              if len(xe)]
        return torch.cat(ys)

    def _padded(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        """Training: a GEMM per expert over its pairs padded to a multiple of PAD_TO rows.

        grouped_mm has no backward on CPU (torch 2.13). oneDNN, which runs bf16 GEMMs there, compiles a kernel
        for every new shape (~1.5 ms), and per-expert token counts change every step; padded counts repeat.
        """
        N, K = ids_NK.shape
        ids = ids_NK.flatten()
        order = ids.argsort(stable=True)  # (N*K,) pairs sorted by expert
        counts_E = torch.bincount(ids, minlength=self.w1.shape[0])
        padded_E = (counts_E + PAD_TO - 1) // PAD_TO * PAD_TO
        shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)  # padding before each group
        slot = torch.arange(N * K, device=ids.device) + shift_E[ids[order]]  # (N*K,) row of each sorted pair
        # P rows; padding rows read token 0 and carry gate weight 0, so they add nothing, forward or backward
        token_P = ids.new_zeros(int(padded_E.sum())).index_copy_(0, slot, order // K)
        gate_P = weights_NK.new_zeros(len(token_P)).index_copy(0, slot, weights_NK.flatten()[order])
        # cast once, not per expert (under autocast), and before the gather, which then moves half the bytes;
        # unbind once: indexing w[e] per expert would give each its own full-size (E, ...) gradient buffer
        dtype = autocast_dtype(x_ND) or x_ND.dtype
        w1, w2, w3 = (w.to(dtype).unbind(0) for w in (self.w1, self.w2, self.w3))
        xs = x_ND.to(dtype).index_select(0, token_P)  # (P, D): P = N*K pairs + padding rows
        # split, not slicing: a slice's backward zero-fills a copy of all of xs per expert; split's concatenates
        groups = zip(xs.split(padded_E.tolist()), gate_P.split(padded_E.tolist()))
        ys = torch.cat([swiglu(xe, w1[e], w2[e], w3[e], gate=ge) for e, (xe, ge) in enumerate(groups) if len(xe)])
        return torch.zeros_like(x_ND).index_add_(0, token_P, ys.to(x_ND.dtype))  # ys: (P, D)



RouteHook = Callable[["MoE", torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Set from outside by training code (balance losses, token dropping, load statistics): called as
        # hook(moe, x_BSD, scores_NE, weights_NK, ids_NK) and returns the gate weights to use (N, K).
        self.route_hook: RouteHook | None = None
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) \
            if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ND = x.flatten(0, -2)
        weights_NK, ids_NK, scores_NE = self.gate(x_ND)
        if self.route_hook is not None:
            weights_NK = self.route_hook(self, x, scores_NE, weights_NK, ids_NK)
        y = self.experts(x_ND, weights_NK, ids_NK)
        if self.shared is not None:
            y = y + self.shared(x_ND)
        return y.view_as(x)
