"""The models of bench/ablation.py: its settings and variants, the MHA baseline (GQA at G = H), and the parameter,
cache and FLOP counts that make each compared pair equal where the claim needs it.

Shapes: B batch, S tokens, D model dim, H query heads, G key/value heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openseek.model import Transformer
from openseek.model.layers import apply_rope
from openseek.model.mla import MLA
from openseek.model.moe import MoE
from openseek.train.config import TrainConfig
from openseek.train.step import init_weights


@dataclass(slots=True)
class Setting:
    hidden: int = 192
    layers: int = 4  # the first dense in the MoE models (first_k_dense_replace = 1, as V2)
    heads: int = 4
    head_dim: int = 48  # d_h
    latent: int = 64  # MLA's d_c, well below H d_h: MHA caches 2 H d_h values per token per layer, MLA d_c + d_R
    ffn: int = 512  # I: the dense width, and every MoE layer's activated width
    experts: int = 8  # GShard's, of width I/2; DeepSeekMoE has 4x as many of width I/8, 2 of them shared
    seq_len: int = 256
    batch: int = 16
    steps: int = 100
    vocab: int = 4096
    lr: float = 3e-3  # swept x lr_factors (the `small` preset's 2e-3 is for 600 steps; short runs favour more)
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Setting(hidden=64, layers=2, heads=4, head_dim=16, latent=24, ffn=192, seq_len=64, batch=8, steps=20, lr=2e-3,
                vocab=512)


@dataclass(frozen=True, slots=True)
class Variant:
    key: str  # in run names
    label: str
    attention: str  # "MHA" or "MLA"
    ffn: str  # "dense", "gshard" or "deepseekmoe"
    router: str = "v2"  # v2: softmax top-k; v3: sigmoid with the selection bias (noaux_tc), renormalised
    recipe: tuple[tuple[str, float], ...] = (("alpha1", 0.003),)  # TrainConfig fields of the MoE recipe
    swept: bool = False  # its own learning-rate sweep; otherwise DeepSeekMoE's best learning rate


V2_LIMIT = (("alpha1", 0.003), ("n_devices", 5), ("device_limit", 2))  # 30 experts: 5 devices of 6, top-6 on 2
V2_DROP = (("alpha1", 0.003), ("n_devices", 5), ("device_limit", 5), ("capacity_factor", 1.0))
V3_BIAS = (("bias_update_speed", 0.001), ("seq_aux_alpha", 0.0001))  # V3 §4.2's gamma and alpha
VARIANTS = {v.key: v for v in [
    Variant("mha", "MHA", "MHA", "dense", swept=True),
    Variant("mla", "MLA", "MLA", "dense", swept=True),
    Variant("gshard", "GShard top-2", "MLA", "gshard", swept=True),
    Variant("deepseekmoe", "DeepSeekMoE", "MLA", "deepseekmoe", swept=True),
    Variant("v3-loss", "V3 router, expert balance loss", "MLA", "deepseekmoe", router="v3"),
    Variant("v3-bias", "V3 router, bias update", "MLA", "deepseekmoe", router="v3", recipe=V3_BIAS),
    Variant("limited", "device-limited (2 of 5 devices)", "MLA", "deepseekmoe", recipe=V2_LIMIT),
    Variant("dropping", "token dropping (capacity 1.0)", "MLA", "deepseekmoe", recipe=V2_DROP),
]}
class GQA(nn.Module):
    """Grouped-query attention: G key/value heads, each shared by H/G query heads; MHA at G = H, MQA at G = 1.

    Training only (no cache). RoPE rotates the whole head dim; the model's freqs_cis is sized for MLA's d_R.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must be >= 1 and divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: object = None,
                cache: torch.Tensor | None = None, kernels: object = None) -> torch.Tensor:
        """Causal self-attention over x (B, S, D) at positions 0 .. S-1 (its own nn.Linear and SDPA: no kernels)."""
        if batch is not None or cache is not None:
            raise ValueError("this GQA is for training: it has no paged-cache path")
        S = x.shape[1]
        angles = torch.arange(S, device=x.device, dtype=torch.float32)[None, :, None] * self.inv_freq  # (1, S, d/2)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (1, S, d/2) complex
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, -1)), freqs_cis)  # (B, S, H, d)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv_heads, -1)), freqs_cis)  # (B, S, G, d)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, -1))  # (B, S, G, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)  # (B, H, S, d)
        return self.wo(o.transpose(1, 2).flatten(2))  # (B, S, D)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model: Transformer) -> tuple[int, int]:
    """(total, activated excluding the embedding): top-k of each layer's E routed experts count (summary.py's rule)."""
    total = _numel(model)
    activated = total - model.embed.weight.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            E, K = m.gate.weight.shape[0], m.gate.top_k
            activated -= _numel(m.experts) * (E - K) // E
    return total, activated


def kv_values(s: Setting, attention: str) -> int:
    """Values cached per token per layer: K and V of every head (MHA), or MLA's latent c_kv plus the shared k_pe."""
    return 2 * s.heads * s.head_dim if attention == "MHA" else s.latent + s.head_dim // 2


def flops_per_token(s: Setting, attention: str, activated: int) -> int:
    """Forward FLOPs per token: 2 per activated weight, plus the scores and weighted values over the causal context
    (on average (S + 1) / 2 tokens; MLA's expanded path scores d_h + d_R dims per head)."""
    d = s.head_dim
    qk = d if attention == "MHA" else d + d // 2
    return 2 * activated + 2 * s.layers * s.heads * (qk + d) * (s.seq_len + 1) // 2


def model_fields(s: Setting, v: Variant) -> dict:
    """ModelConfig fields: MLA with d_c = s.latent and d_R = d_h / 2, no query compression; MoE after layer 0.

    GShard: E experts of width I/2, top-2, none shared. DeepSeekMoE cuts each in 4 (width I/8) and isolates 2 as
    shared: 4E - 2 routed, top-6, + 2 shared, so total, activated and per-token expert FLOPs equal GShard's."""
    d = s.head_dim
    m = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, q_lora_rank=None,
             kv_lora_rank=s.latent, qk_nope_head_dim=d, qk_rope_head_dim=d // 2, v_head_dim=d, rope_scaling=None,
             intermediate_size=s.ffn, n_routed_experts=None, first_k_dense_replace=1)
    if v.ffn == "gshard":
        m.update(n_routed_experts=s.experts, moe_intermediate_size=s.ffn // 2, num_experts_per_tok=2,
                 n_shared_experts=0)
    elif v.ffn == "deepseekmoe":
        m.update(n_routed_experts=4 * s.experts - 2, moe_intermediate_size=s.ffn // 8, num_experts_per_tok=6,
                 n_shared_experts=2)
    if v.router == "v3":
        m.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1)
    if v.ffn == "dense":  # the attention with fewer weights gets a wider FFN (3 D I weights) to even them out
        m["intermediate_size"] = s.ffn + round((max(attention_params(s, a) for a in ("MHA", "MLA"))
                                                - attention_params(s, v.attention)) / (3 * s.hidden))
    return m


def attention_params(s: Setting, attention: str) -> int:
    """Weights of one attention layer (MHA: H d_h for each of Q, K, V and the output)."""
    if attention == "MHA":
        return 4 * s.hidden * s.heads * s.head_dim
    d = s.head_dim
    m = dict(hidden_size=s.hidden, num_attention_heads=s.heads, q_lora_rank=None, kv_lora_rank=s.latent,
             qk_nope_head_dim=d, qk_rope_head_dim=d // 2, v_head_dim=d, rope_scaling=None, num_hidden_layers=1)
    with torch.device("meta"):
        return _numel(MLA(TrainConfig(model=m, vocab_size=s.vocab).model_config()))


def build_model(s: Setting, v: Variant, cfg: TrainConfig) -> Transformer:
    """The variant's Transformer, initialised from the run's seed (after the MHA swap: every variant drawn alike)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config())
    if v.attention == "MHA":
        for block in model.layers:
            block.attn = GQA(s.hidden, s.heads, s.heads, s.head_dim)
    init_weights(model, cfg.init_std, cfg.seed)
    return model.train()
