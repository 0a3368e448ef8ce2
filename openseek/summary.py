"""What a ModelConfig amounts to: architecture facts, parameter counts, and KV-cache size per token.

Parameter counts come from the numel of the real modules built on the meta device (no memory, no weights),
so they follow the model code rather than a formula that could drift from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .config import ModelConfig
from .model import Transformer
from .model.moe import Experts

CACHE_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DEFAULT_CACHE_DTYPE = "bf16"


@dataclass(slots=True)
class ParamCounts:
    total: int  # main model: embedding, layers, final norm, head (once if tied); MTP excluded
    embedding: int
    head: int  # 0 when tied to the embedding
    routed_experts: int  # all routed experts of all MoE layers
    activated: int  # per token: all but the routed experts, plus num_experts_per_tok of them per MoE layer
    activated_excl_embedding: int  # the papers' convention: the input lookup table is not compute
    attention_per_layer: int
    routed_expert: int  # one routed expert (0 if the model has none)
    mtp: int  # V3 multi-token-prediction layers' own parameters (embedding and head are shared)


@dataclass(slots=True)
class KVCache:
    layers: int
    latent_per_layer: int  # MLA: c_kv + k_pe, what absorbed decode caches
    expanded_per_layer: int  # per-head K (nope + rope) and V, what transformers' DeepseekV2/V3 cache
    dtype: str
    bytes_per_value: int

    @property
    def latent_per_token(self) -> int:
        return self.layers * self.latent_per_layer

    @property
    def expanded_per_token(self) -> int:
        return self.layers * self.expanded_per_layer

    @property
    def ratio(self) -> float:
        return self.expanded_per_layer / self.latent_per_layer

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latent_per_token": self.latent_per_token,
                "expanded_per_token": self.expanded_per_token,
                "latent_bytes_per_token": self.latent_per_token * self.bytes_per_value,
                "expanded_bytes_per_token": self.expanded_per_token * self.bytes_per_value,
                "ratio": self.ratio}


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of Transformer(cfg), from its modules built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=True)
    mtp = _numel(model.mtp)
    total = _numel(model) - mtp
    embedding = model.embed.weight.numel()
    head = 0 if cfg.tie_word_embeddings else model.head.weight.numel()
    routed, active_routed, one_expert = 0, 0, 0
    for block in model.layers:
        for m in block.modules():
            if isinstance(m, Experts):
                n_experts = m.w1.shape[0]  # (E, F, D)
                one_expert = _numel(m) // n_experts
                routed += _numel(m)
                active_routed += cfg.num_experts_per_tok * one_expert
    activated = total - routed + active_routed
    # Tied: the table still does the head's matmul for every token, so it stays activated.
    excl = activated - (0 if cfg.tie_word_embeddings else embedding)
    return ParamCounts(total=total, embedding=embedding, head=head, routed_experts=routed, activated=activated,
                       activated_excl_embedding=excl, attention_per_layer=_numel(model.layers[0].attn),
                       routed_expert=one_expert, mtp=mtp)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def kv_cache(cfg: ModelConfig, dtype: str = DEFAULT_CACHE_DTYPE) -> KVCache:
    """Cached values per token: MLA's latent versus the expanded per-head K/V (reference §1.5, §8.1)."""
    if dtype not in CACHE_DTYPE_BYTES:
        raise ValueError(f"cache dtype {dtype!r} is invalid: allowed: {', '.join(CACHE_DTYPE_BYTES)}")
    expanded = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return KVCache(layers=cfg.num_hidden_layers, latent_per_layer=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                   expanded_per_layer=expanded, dtype=dtype, bytes_per_value=CACHE_DTYPE_BYTES[dtype])


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture facts `openseek info` prints, as plain data."""
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    ys = cfg.rope_scaling or {}
    return {
        "model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "dense_layers": cfg.num_hidden_layers - n_moe,
        "moe_layers": n_moe, "mtp_layers": cfg.num_nextn_predict_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings, "heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "routed_experts": cfg.n_routed_experts or 0, "shared_experts": cfg.n_shared_experts if n_moe else 0,
        "active_experts": cfg.num_experts_per_tok if n_moe else 0, "moe_intermediate_size": cfg.moe_intermediate_size,
        "topk_method": cfg.topk_method, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "scoring_func": cfg.scoring_func, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor, "rope_theta": cfg.rope_theta,
        "yarn_factor": ys.get("factor"), "yarn_mscale_all_dim": ys.get("mscale_all_dim"),
        "softmax_scale": cfg.softmax_scale, "max_position_embeddings": cfg.max_position_embeddings,
    }


def summarize(cfg: ModelConfig, cache_dtype: str = DEFAULT_CACHE_DTYPE) -> dict[str, Any]:
    """Architecture, parameter counts and KV-cache sizes: the data behind `openseek info` (and its --json)."""
    return {"architecture": architecture(cfg), "parameters": asdict(count_parameters(cfg)),
            "kv_cache": kv_cache(cfg, cache_dtype).to_dict()}
