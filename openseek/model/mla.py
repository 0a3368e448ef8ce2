"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1.

Shapes: B batch, S query tokens, T key tokens, H heads, D model dim, C latent (kv_lora_rank),
R rope dim, N no-rope q/k head dim (qk_nope_head_dim), V value head dim.

Keys and values are one latent per token: c_kv (C, RMS-normalised) plus a rope key k_pe (R) shared by all
heads. The expanded path up-projects the latent to per-head K/V (training, prefill); absorbed decode, which
attends over the latents directly, builds on `project_q` / `project_kv` in the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = C = cfg.kv_lora_rank
        D, qk_dim = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, C + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(C, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.softmax_scale = cfg.softmax_scale

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries: q_nope (B, S, H, N) and rotated q_pe (B, S, H, R)."""
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.unflatten(-1, (self.n_heads, -1))  # (B, S, H, N + R)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches per token: normalised latent c_kv (B, S, C) and rotated k_pe (B, S, R)."""
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention with per-head K/V up-projected from the latents; causal when mask is None. -> (B, S, H, V)"""
        H, T = self.n_heads, c_kv.shape[1]
        kv = self.wkv_b(c_kv).unflatten(-1, (H, -1))  # (B, T, H, N + V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, S, H, N + R)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, T, H, -1)), dim=-1)  # (B, T, H, N + R)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return o.transpose(1, 2)  # (B, S, H, V)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        o = self.attend_expanded(q_nope, q_pe, c_kv, k_pe)
        return self.wo(o.flatten(2))  # (B, S, D)
