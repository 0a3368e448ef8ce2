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
from .layers import SwiGLU
from .ops import TRAINING, Kernels


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
        logits_NE = F.linear(_as_float32(x_ND), _as_float32(self.weight))
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
        elif self.scaling != 1.0:
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


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32; x itself when it already is (a decode step routes one row per layer: no no-op casts)."""
    return x if x.dtype == torch.float32 else x.float()


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 (E, F, D), w2 (E, D, F)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor,
                kernels: Kernels = TRAINING) -> torch.Tensor:
        """sum over k of weights_NK[n, k] * SwiGLU_{ids_NK[n, k]}(x_n)."""
        return kernels.routed_experts(self.w1, self.w2, self.w3, x_ND, weights_NK, ids_NK)


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

    def forward(self, x: torch.Tensor, kernels: Kernels = TRAINING) -> torch.Tensor:
        x_ND = x.flatten(0, -2)
        weights_NK, ids_NK, scores_NE = self.gate(x_ND)
        if self.route_hook is not None:
            weights_NK = self.route_hook(self, x, scores_NE, weights_NK, ids_NK)
        y = self.experts(x_ND, weights_NK, ids_NK, kernels)
        if self.shared is not None:
            y = y + self.shared(x_ND, kernels)
        return y.view_as(x)
