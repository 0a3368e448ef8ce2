"""The DeepSeek-V2/V3 decoder: pre-norm blocks of MLA and a dense or MoE FFN.

The entry point picks the kernel set (ops.py): hidden_states runs TRAINING's, hidden_states_paged its batch's.
Shapes: B batch, S tokens, N packed new tokens, D model dim, V vocabulary, R rope dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from .batch import ForwardBatch
from .layers import Linear, RMSNorm, Rotary, SwiGLU
from .mla import MLA
from .moe import MoE
from .ops import INFERENCE, TRAINING, Kernels


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: ForwardBatch | None = None,
                cache: torch.Tensor | None = None, kernels: Kernels = TRAINING) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x, kernels), freqs_cis, batch, cache, kernels)
        return x + self.ffn(self.ffn_norm(x, kernels), kernels)


class MTPLayer(nn.Module):
    """DeepSeek-V3 multi-token prediction module: predicts token t+2 from h_t and the embedding of t+1.

    Its embedding and output head are the main model's (shared in the checkpoint too).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, next_embeds: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        # Embedding first, then hidden state: the order that works with the released weights (reference §5.4).
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h)), dim=-1))  # (B, S, D)
        return self.norm(self.block(x, freqs_cis))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, with_mtp: bool = False):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.rotary = Rotary(cfg)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kernels: Kernels = TRAINING) -> torch.Tensor:
        """Final-normed hidden states (B, S, D) of a causal forward over input_ids (B, S); the training kernels
        unless told otherwise (INFERENCE is faster without autograd, but runs on one device's weights only)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        freqs_cis = self.rotary(positions)  # (B, S, R/2) complex
        x = self.embed(input_ids)  # (B, S, D)
        for layer in self.layers:
            x = layer(x, freqs_cis, kernels=kernels)
        return self.norm(x, kernels)

    def hidden_states_paged(self, input_ids: torch.Tensor, batch: ForwardBatch, kv_cache: Sequence[torch.Tensor],
                            kernels: Kernels = INFERENCE) -> torch.Tensor:
        """Hidden states (N, D) of N packed new tokens, reading and extending kv_cache: a (slots, C + R) tensor per
        layer."""
        freqs_cis = self.rotary(batch.positions[None])  # (1, N, R/2) complex
        x = self.embed(input_ids)[None]  # (1, N, D)
        for layer, cache in zip(self.layers, kv_cache):
            x = layer(x, freqs_cis, batch, cache, kernels)
        return self.norm(x[0], kernels)

    def logits(self, h: torch.Tensor, kernels: Kernels = INFERENCE) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., D); the engine samples from them, hence its kernels."""
        return self.head(h, kernels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kernels: Kernels = TRAINING) -> torch.Tensor:
        """Logits (B, S, V) for input_ids (B, S)."""
        return self.logits(self.hidden_states(input_ids, positions, kernels), kernels)

    def absorb_weights(self) -> None:
        """Build every MLA's absorbed W_UK / W_UV^T from its wkv_b (the paged path reads them); call again after
        the weights change, as a trainer whose model is also served does after each step."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.absorb_weights()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype
