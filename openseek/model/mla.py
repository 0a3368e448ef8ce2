"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1.

Shapes: B batch, S query tokens, T key tokens, N packed new tokens, H heads, D model dim, C latent
(kv_lora_rank), R rope dim, Q no-rope q/k head dim (qk_nope_head_dim), U value head dim (v_head_dim).

Keys and values are one latent per token: c_kv (C, RMS-normalised) plus a rope key k_pe (R) shared by all
heads. The expanded path up-projects the latent to per-head K/V (training, long prefill). The absorbed path
folds W_UK into the query and W_UV after the output, so attention runs over the cached latents directly:
MQA with one 576-wide key and a 512-wide value (reference §1.4).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import ForwardBatch
from .layers import Linear, RMSNorm, apply_rope
from .ops import TRAINING, Kernels
from .quant import QuantizedWeight


PREFILL_ABSORB_RATIO = 4  # prefill chunks this many times shorter than their context use the absorbed path


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = C = cfg.kv_lora_rank
        D, qk_dim = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = Linear(D, H * qk_dim)
        else:
            self.wq_a = Linear(D, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, H * qk_dim)
        self.wkv_a = Linear(D, C + self.rope_dim)
        self.kv_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.wkv_b = Linear(C, H * (self.nope_dim + self.v_dim))
        self.wo = Linear(H * self.v_dim, D)
        self.softmax_scale = cfg.softmax_scale
        # the absorbed path's W_UK (H, Q, C) and W_UV^T (H, C, U): derived from wkv_b by absorb_weights, not saved;
        # for a quantised wkv_b also as its int values and scales (absorb_weights says how they are laid out)
        for name in ("w_uk", "w_uv_t", "w_uk_int8", "w_uk_scale", "w_uv_int8", "w_uv_scale"):
            self.register_buffer(name, None, persistent=False)

    def absorb_weights(self, kernels: Kernels = TRAINING) -> None:
        """Build W_UK and W_UV^T out of wkv_b, stored as vLLM's W_UK_T and W_UV, at the memory cost of one more
        wkv_b: bmm on strided views of wkv_b itself would copy them on every call. Call again after wkv_b changes.
        A quantised wkv_b is dequantised: W_UK and W_UV^T are kept in the model's float dtype (H * (Q + U) * C
        values a layer, 2.1M in V2-Lite: 0.4% of its weights), read by bmm at full precision."""
        H, Q, U, C = self.n_heads, self.nope_dim, self.v_dim, self.kv_lora_rank
        w = kernels.dense(self.wkv_b.weight).detach().view(H, Q + U, C)
        # each stored with the dim its product sums over last (the view transposes it back): a one-row product
        # then reads each row contiguously, which COMPILED's multiply-and-sum does at twice the rate of the other
        # layout (21 against 10.6 GB/s on V2-Lite's shapes, 1 thread); torch.bmm reads the views in place
        self.w_uk = w[:, :Q].transpose(1, 2).contiguous().transpose(1, 2)  # (H, Q, C), stored (H, C, Q)
        self.w_uv_t = w[:, Q:].contiguous().transpose(1, 2)  # (H, C, U), stored (H, U, C)
        self.w_uk_int8 = self.w_uk_scale = self.w_uv_int8 = self.w_uv_scale = None
        if isinstance(self.wkv_b.weight, QuantizedWeight):
            self._absorb_int8(H, Q, C)

    def _absorb_int8(self, H: int, Q: int, C: int) -> None:
        """W_UK and W_UV^T once more as a quantised wkv_b holds them: its int values (int8, or int4 values one to a
        byte), stored as the float copies are, and float32 scales, one per block of rows and columns of the stored
        (H, N, K) matrix: (H, G, Q) for W_UK^T (C, Q), (H, U, G) for W_UV (U, C), G the groups of C (1 for int8).
        q * s is exactly the float copy, in a quarter of float32's bytes: decode's products read these
        (ops.head_bmm_inference, head_bmm_compiled), a quantised model's decode otherwise reading more bytes here
        than in its experts."""
        q, s = self.wkv_b.weight.quantized()  # (H * (Q + U), C), (H * (Q + U),) or (H * (Q + U), G)
        q, s = q.view(H, -1, C), s.float().view(H, q.shape[0] // H, -1)  # (H, Q + U, C), (H, Q + U, G)
        self.w_uk_int8, self.w_uk_scale = q[:, :Q].transpose(1, 2).contiguous(), s[:, :Q].transpose(1, 2).contiguous()
        self.w_uv_int8, self.w_uv_scale = q[:, Q:].contiguous(), s[:, Q:].contiguous()

    def project_q(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                  kernels: Kernels = TRAINING) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries: q_nope (B, S, H, Q) and rotated q_pe (B, S, H, R)."""
        if hasattr(self, "wq"):
            q = self.wq(x, kernels)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x, kernels), kernels), kernels)
        q = q.unflatten(-1, (self.n_heads, -1))  # (B, S, H, Q + R)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, (kernels.rope or apply_rope)(q_pe, freqs_cis)

    def project_kv(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                   kernels: Kernels = TRAINING) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches per token: normalised latent c_kv (B, S, C) and rotated k_pe (B, S, R)."""
        c_kv, k_pe = self.wkv_a(x, kernels).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv, kernels), (kernels.rope or apply_rope)(k_pe, freqs_cis)

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        mask: torch.Tensor | None = None, kernels: Kernels = TRAINING) -> torch.Tensor:
        """Attention with per-head K/V up-projected from the latents; causal when mask is None. -> (B, S, H, U)"""
        H, T = self.n_heads, c_kv.shape[1]
        kv = self.wkv_b(c_kv, kernels).unflatten(-1, (H, -1))  # (B, T, H, Q + U)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, S, H, Q + R)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, T, H, -1)), dim=-1)  # (B, T, H, Q + R)
        o = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.softmax_scale)
        return o.transpose(1, 2)  # (B, S, H, U)

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latents: torch.Tensor,
                        mask: torch.Tensor | None, kernels: Kernels = TRAINING) -> torch.Tensor:
        """Attention over latents (B, T, C + R) for queries (B, S, H, .); mask (B, S, T) bool. -> (B, S, H, U)"""
        if self.w_uk is None:
            raise RuntimeError("MLA's absorbed W_UK / W_UV^T were never built: call Transformer.absorb_weights() "
                               "after loading or changing the weights (the engine's ModelRunner does)")
        H, C = self.n_heads, self.kv_lora_rank
        B, S = q_nope.shape[:2]
        int8_uk = None if self.w_uk_int8 is None else (self.w_uk_int8, self.w_uk_scale)
        q_lat = kernels.head_bmm(q_nope.reshape(B * S, H, -1).transpose(0, 1), self.w_uk, int8_uk)  # (H, B*S, C)
        q = torch.cat((q_lat.transpose(0, 1).view(B, S, H, C), q_pe), dim=-1)  # (B, S, H, C + R)
        scores = torch.bmm(q.reshape(B, S * H, -1), latents.transpose(1, 2)) * self.softmax_scale  # (B, S*H, T)
        scores = scores.view(B, S, H, -1)  # (B, S, H, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        p = scores.softmax(-1, dtype=torch.float32)  # (B, S, H, T)
        p = p if p.dtype == q.dtype else p.to(q.dtype)
        o_lat = torch.bmm(p.view(B, S * H, -1), latents[..., :C]).view(B * S, H, C)  # (B*S, H, C)
        int8_uv = None if self.w_uv_int8 is None else (self.w_uv_int8, self.w_uv_scale)
        o = kernels.head_bmm(o_lat.transpose(0, 1), self.w_uv_t, int8_uv)  # (H, B*S, U)
        return o.transpose(0, 1).reshape(B, S, H, -1)  # (B, S, H, U)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: ForwardBatch | None = None,
                cache: torch.Tensor | None = None, kernels: Kernels = TRAINING) -> torch.Tensor:
        """Causal self-attention over x (B, S, D); with a batch, x is (1, N, D) packed over the paged cache."""
        q_nope, q_pe = self.project_q(x, freqs_cis, kernels)
        c_kv, k_pe = self.project_kv(x, freqs_cis, kernels)
        if batch is None:
            o = self.attend_expanded(q_nope, q_pe, c_kv, k_pe, kernels=kernels)
        else:
            cache.index_put_((batch.slot_mapping,), torch.cat((c_kv, k_pe), dim=-1)[0])  # cache: (slots, C + R)
            o = self._attend_paged(q_nope[0], q_pe[0], cache, batch, kernels)[None]
        return self.wo(o.flatten(2), kernels)  # (B, S, D)

    def _attend_paged(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch,
                      kernels: Kernels) -> torch.Tensor:
        """Packed queries (N, H, .) over each sequence's cached latents. -> (N, H, U)"""
        outs, nd = [], batch.num_decodes
        if nd:  # all decodes in one absorbed call, padded to the longest context
            slots = batch.decode_slots
            latents = cache.index_select(0, slots.flatten()).view(*slots.shape, -1)  # (B, T, C + R)
            outs.append(self.attend_absorbed(q_nope[:nd, None], q_pe[:nd, None], latents, batch.decode_mask,
                                             kernels)[:, 0])
        start = nd
        for i in range(nd, len(batch.query_lens)):  # prefill chunks, one sequence at a time
            S, T = batch.query_lens[i], batch.context_lens[i]
            latents = cache.index_select(0, batch.gather_slots(i, T))  # (T, C + R)
            qn, qp = q_nope[start:start + S, None], q_pe[start:start + S, None]  # (S, 1, H, .)
            mask = torch.arange(T, device=cache.device)[None] <= torch.arange(T - S, T, device=cache.device)[:, None]
            if S * PREFILL_ABSORB_RATIO <= T:  # a short chunk over a long context: absorbed is cheaper
                o = self.attend_absorbed(qn.transpose(0, 1), qp.transpose(0, 1), latents[None], mask[None],
                                         kernels)[0]
            else:
                c_kv, k_pe = latents[None].split([self.kv_lora_rank, self.rope_dim], dim=-1)
                o = self.attend_expanded(qn.transpose(0, 1), qp.transpose(0, 1), c_kv, k_pe,
                                         None if S == T else mask, kernels)[0]
            outs.append(o)
            start += S
        return torch.cat(outs)
