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
from .validation import check

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
    check(dtype in CACHE_DTYPE_BYTES, "cache_dtype", dtype, f"allowed: {', '.join(CACHE_DTYPE_BYTES)}")
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


def format_info(data: dict[str, Any]) -> str:
    """The human-readable `openseek info` report."""
    a, p, kv = data["architecture"], data["parameters"], data["kv_cache"]
    src = data["source"]
    routing = a["topk_method"]
    if a["topk_method"] != "greedy" and a["n_group"] > 1:
        routing += f" ({a['n_group']} groups, top {a['topk_group']})"
    routing += f", {a['scoring_func']} scores" + (", top-k renormalised" if a["norm_topk_prob"] else "")
    routing += f", scaling {a['routed_scaling_factor']:g}"
    yarn = f"factor {a['yarn_factor']:g}, mscale_all_dim {a['yarn_mscale_all_dim'] or 0:g}" \
        if a["yarn_factor"] else "off (plain RoPE)"
    q_rank = a["q_lora_rank"] if a["q_lora_rank"] is not None else "none (no query compression)"
    rows = [
        ("model type", a["model_type"]),
        ("layers", f"{a['layers']} ({a['dense_layers']} dense + {a['moe_layers']} MoE)"
         + (f", + {a['mtp_layers']} MTP" if a["mtp_layers"] else "")),
        ("hidden size", f"{a['hidden_size']} (dense FFN {a['intermediate_size']}, vocab {a['vocab_size']})"),
        ("attention heads", a["heads"]),
        ("q_lora_rank", q_rank),
        ("kv_lora_rank", a["kv_lora_rank"]),
        ("head dims", f"qk nope {a['qk_nope_head_dim']} + rope {a['qk_rope_head_dim']}, v {a['v_head_dim']}"),
    ]
    if a["moe_layers"]:
        rows += [("experts", f"{a['routed_experts']} routed + {a['shared_experts']} shared, {a['active_experts']} "
                             f"active per token (expert FFN {a['moe_intermediate_size']})"),
                 ("routing", routing)]
    rows += [("YaRN", yarn), ("softmax scale", f"{a['softmax_scale']:.6f}")]
    emb = _count(p["embedding"]) + (" (tied to head)" if a["tie_word_embeddings"] else f" / {_count(p['head'])}")
    params = [
        ("total", _count(p["total"]) + (" (MTP excluded)" if p["mtp"] else "")),
        ("activated per token", f"{_count(p['activated'])} incl. embedding and head"),
        ("", f"{_count(p['activated_excl_embedding'])} excl. input embedding"),
        ("embedding / head", emb),
        ("attention per layer", _count(p["attention_per_layer"])),
    ]
    if p["routed_expert"]:
        params.append(("one routed expert", _count(p["routed_expert"])))
    if p["mtp"]:
        params.append(("MTP layers", f"{_count(p['mtp'])} (own parameters; embedding and head shared)"))
    b = kv["bytes_per_value"]
    cache = [
        ("values per token per layer", f"{kv['latent_per_layer']:,}", f"{kv['expanded_per_layer']:,}"),
        ("values per token", f"{kv['latent_per_token']:,}", f"{kv['expanded_per_token']:,}"),
        (f"bytes per token ({kv['dtype']})", _bytes(kv["latent_per_token"] * b), _bytes(kv["expanded_per_token"] * b)),
        ("ratio (expanded / latent)", "1x", f"{kv['ratio']:.1f}x"),
    ]
    title = f"preset {src['preset']}" if "preset" in src else src["path"]
    lines = [f"openseek info: {title}", "", "Architecture"]
    lines += [f"  {k:<22}{v}" for k, v in rows]
    lines += ["", "Parameters"] + [f"  {k:<22}{v}" for k, v in params]
    lines += ["", f"KV cache per token{'MLA latent':>22}{'expanded K/V':>16}"]
    lines += [f"  {k:<26}{x:>14}{y:>16}" for k, x, y in cache]
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
