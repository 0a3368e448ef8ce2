"""ModelConfig: every architecture field of DeepSeek-V2 / V2-Lite / V3, read from and written to config.json.

Stdlib only. Hub configs carry `rope_theta` + `rope_scaling` (`type: yarn`); current transformers writes
`rope_parameters` (`rope_type: yarn`, `rope_theta` inside). Both are accepted; `to_hf()` writes both spellings so
old remote code and current transformers read the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .validation import FieldError, is_int, is_number

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
TOPK_ALIASES = {"gready": "greedy"}  # the misspelling in the original config docstring
SCORING_FUNCS = ("softmax", "sigmoid")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
OWNER = "config field "  # FieldError's prefix: the messages read "config field n_group=7 is invalid: ..."
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# Integer sizes as (least, most): the upper bounds lie far above any released model (V3: 7168 wide, 61 layers,
# 256 experts, 129280 tokens) and low enough that a typo fails here, not as a build that allocates for minutes.
# Positions become float32 angles, exact up to 2^24.
SIZES = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
         "num_hidden_layers": (1, 1 << 10), "num_attention_heads": (1, 1 << 12), "kv_lora_rank": (1, 1 << 16),
         "qk_nope_head_dim": (1, 1 << 12), "qk_rope_head_dim": (1, 1 << 12), "v_head_dim": (1, 1 << 12),
         "max_position_embeddings": (2, 1 << 24), "num_nextn_predict_layers": (0, 1 << 10),
         "first_k_dense_replace": (0, None), "moe_layer_freq": (1, None)}
MOE_SIZES = {"n_routed_experts": (1, 1 << 16), "moe_intermediate_size": (1, 1 << 20), "n_shared_experts": (0, 1 << 10),
             "num_experts_per_tok": (1, None), "n_group": (1, None), "topk_group": (1, None)}
MAX_PARAMETERS = 10 ** 13  # 20 TB in bf16, ten times the largest released models: beyond it, surely a typo


@dataclass
class ModelConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # dense FFN layers
    moe_intermediate_size: int = 1408  # one routed expert
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None  # None: no query compression (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 64  # None: every layer dense
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN parameters (YARN_KEYS), or None for plain RoPE
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    model_type: str = "deepseek_v2"
    num_nextn_predict_layers: int = 0  # V3 multi-token-prediction layers stored after the main ones
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept for write-back

    def __post_init__(self) -> None:
        self.topk_method = TOPK_ALIASES.get(self.topk_method, self.topk_method)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by MLA: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(s, mscale_all_dim)^2 (reference §3.3)."""
        scale = self.qk_head_dim ** -0.5
        ys = self.rope_scaling
        if ys and ys.get("mscale_all_dim"):
            m = yarn_mscale(ys["factor"], ys["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise FieldError naming the first invalid field; ValueError when the sizes together are too large."""
        def bad(name: str, allowed: str) -> FieldError:
            return FieldError(name, getattr(self, name), allowed, OWNER)

        _check_sizes(self, SIZES)
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.q_lora_rank is not None:
            _check_sizes(self, {"q_lora_rank": (1, 1 << 16)}, " or null (no query compression)")
        if self.model_type not in MODEL_TYPES:
            raise bad("model_type", f"allowed: {', '.join(MODEL_TYPES)}")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"allowed: {', '.join(TOPK_METHODS)} (or the spelling 'gready')")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"allowed: {', '.join(SCORING_FUNCS)}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive finite number")
        if self.n_routed_experts is not None:
            self._validate_moe(bad)
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise bad("rope_scaling", "must be an object of YaRN parameters, or null")
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in self.rope_scaling]
            if missing:
                raise bad("rope_scaling", f"YaRN needs {', '.join(missing)}")
            if not is_number(self.rope_scaling["factor"]) or self.rope_scaling["factor"] <= 0:
                raise bad("rope_scaling", "factor must be a positive number")
        if (n := self.num_parameters()) > MAX_PARAMETERS:
            raise ValueError(f"config implies {n:.3g} parameters, more than the {MAX_PARAMETERS:.0e} openseek "
                             "builds: check hidden_size, num_hidden_layers, vocab_size, n_routed_experts and the "
                             "intermediate sizes")

    def _validate_moe(self, bad) -> None:
        _check_sizes(self, {"n_routed_experts": MOE_SIZES["n_routed_experts"]}, " or null (all layers dense)")
        _check_sizes(self, MOE_SIZES)
        e = self.n_routed_experts
        if not 1 <= self.num_experts_per_tok <= e:
            raise bad("num_experts_per_tok", f"must lie in [1, n_routed_experts={e}]")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise bad("scoring_func", "topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
        if self.topk_method != "greedy":
            if self.n_group < 1 or e % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={e}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must lie in [1, n_group={self.n_group}]")
            if self.topk_group * (e // self.n_group) < self.num_experts_per_tok:
                raise bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
            if self.topk_method == "noaux_tc" and e // self.n_group < 2:
                raise bad("n_group", "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group")

    def num_parameters(self) -> int:
        """Parameters of the main model (MTP layers excluded), by formula, without building anything; a test
        keeps it equal to summary.count_parameters, which counts the built modules."""
        D, H, C, L = self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.num_hidden_layers
        q_out = H * self.qk_head_dim
        wq = D * q_out if self.q_lora_rank is None else self.q_lora_rank * (D + 1 + q_out)
        attn = wq + D * (C + self.qk_rope_head_dim) + C + C * H * (self.qk_nope_head_dim + self.v_head_dim) \
            + H * self.v_head_dim * D
        n_moe = sum(map(self.is_moe_layer, range(L)))
        moe = 0
        if self.n_routed_experts is not None:  # router, routed and shared experts
            E, F = self.n_routed_experts, self.moe_intermediate_size
            moe = E * D + 3 * D * F * (E + self.n_shared_experts)
        layers = L * (attn + 2 * D) + n_moe * moe + (L - n_moe) * 3 * D * self.intermediate_size
        return layers + self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D

    # ---- config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict (hub layout or current transformers layout)."""
        if not isinstance(d, dict):
            raise TypeError(f"a model config is a dict of config.json fields, not a {type(d).__name__}")
        d = dict(d)
        if d.get("model_type") == "deepseek_v3":  # V3 configs (and transformers' V3 class) imply its router
            d.setdefault("topk_method", "noaux_tc")
            d.setdefault("scoring_func", "sigmoid")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling", "rope_theta"}
        kwargs: dict[str, Any] = {k: d.pop(k) for k in list(d) if k in names}
        if "dtype" in d:  # transformers >= 4.56 spells torch_dtype this way
            kwargs.setdefault("torch_dtype", d.pop("dtype"))
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        if not isinstance(rope, dict):
            raise FieldError("rope_scaling", rope, "must be an object (rope_type and its parameters) or null", OWNER)
        theta = d.pop("rope_theta", None) or rope.get("rope_theta") or 10000.0
        if not is_number(theta):
            raise FieldError("rope_theta", theta, "must be a positive finite number", OWNER)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "yarn"):
            raise FieldError("rope_scaling.type", kind, "allowed: yarn, or none", OWNER)
        kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = {k: rope[k] for k in YARN_KEYS + ("attention_factor",) if k in rope} \
            if kind == "yarn" else None
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = 1
        if kwargs.get("num_nextn_predict_layers") is None:
            kwargs["num_nextn_predict_layers"] = 0
        for derived in ("qk_head_dim", "head_dim"):  # transformers writes these; they follow from the fields
            d.pop(derived, None)
        if d.get("hidden_act", "silu") != "silu":
            raise FieldError("hidden_act", d["hidden_act"], "allowed: silu", OWNER)
        for name in ("attention_bias", "mlp_bias"):
            if d.get(name, False):
                raise FieldError(name, d[name], "must be false: DeepSeek projections have no bias", OWNER)
        return cls(**kwargs, extra=d)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict: loadable by transformers and by the hub remote code."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "rope_scaling", "torch_dtype"):
                d[f.name] = getattr(self, f.name)
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d.setdefault("architectures", [arch])
        d["num_key_value_heads"] = self.num_attention_heads  # MLA: every head has its own expanded K/V
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        if self.torch_dtype is not None:
            d["torch_dtype"] = d["dtype"] = self.torch_dtype
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            d["rope_scaling"] = {"type": "yarn", **self.rope_scaling}
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta, **self.rope_scaling}
        d["rope_parameters"] = rope
        if self.quantization_config is None:
            d.pop("quantization_config")
        return dict(sorted(d.items()))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(d), "a number")
            raise ValueError(f"{path} holds {kind}: a config.json is a JSON object of config fields "
                             '({"hidden_size": ..., ...})')
        return cls.from_hf(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def _check_sizes(cfg: ModelConfig, sizes: dict[str, tuple[int, int | None]], alt: str = "") -> None:
    """Each named field an int in [least, most] (JSON's 1e9 is a float, and refused)."""
    for name, (least, most) in sizes.items():
        v = getattr(cfg, name)
        if not is_int(v) or v < least or (most is not None and v > most):
            allowed = f"an integer >= {least}" if most is None else f"an integer in [{least}, {most}]"
            raise FieldError(name, v, f"must be {allowed}{alt}", OWNER)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---- presets: the shipped architectures, as data (reference §4.1) --------------------------------
_YARN_V2 = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}
PRESETS: dict[str, dict[str, Any]] = {
    "v2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
               num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
               n_shared_experts=2, num_experts_per_tok=6, topk_method="group_limited_greedy", n_group=8,
               topk_group=3, routed_scaling_factor=16.0, rope_scaling=_YARN_V2),
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy", rope_scaling=_YARN_V2),
    "v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
               num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=256,
               n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, topk_method="noaux_tc",
               n_group=8, topk_group=4, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
               bos_token_id=0, eos_token_id=1, model_type="deepseek_v3", num_nextn_predict_layers=1,
               rope_scaling={**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise FieldError("preset", name, f"allowed: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])
