"""TrainConfig: everything a training run depends on, as data; presets as dicts.

CLI flags are derived from the fields (`openseek train --lr 3e-4 ...`), so every default lives here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..validation import check, is_int, is_number
from .tasks import TASKS

SCHEDULES = ("step", "cosine")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOSS_NORMS = ("sequence", "token")  # grpo.py's


@dataclass
class TrainConfig:
    # model (ModelConfig fields; vocab_size comes from the tokenizer)
    model: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    init_std: float = 0.006  # V2 paper §3.1.2
    init: str | None = None  # a model folder (weights, config, tokenizer) to start from instead of random weights
    sft: bool = False  # supervised fine-tuning of init on instruction pairs from the corpus (train/sft.py)
    grpo: bool = False  # reinforcement learning of init with GRPO on task's rewards (train/grpo.py)
    task: str | None = None  # a registered task (train/tasks.py): with sft, its demonstrations are the data
    # data
    data: list[str] = field(default_factory=list)  # files or folders; empty: the Python standard library
    val_fraction: float = 0.02
    max_tokenizer_bytes: int = 20_000_000
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    # optimisation (V2 paper: AdamW 0.9/0.95, wd 0.1, clip 1.0, warm-up then x0.316 at 60% and 90%)
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "step"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "float32"  # autocast dtype for the forward
    device: str = "auto"  # auto: cuda when a GPU is available (one per rank under torchrun), else cpu
    seed: int = 0
    # the MoE recipe (balance losses, device-limited routing set on the routers from outside, dropping, V3 options)
    alpha1: float = 0.003
    alpha2: float = 0.0
    alpha3: float = 0.0
    n_devices: int = 1
    device_limit: int = 1
    capacity_factor: float | None = None
    drop_exempt_fraction: float = 0.1
    seq_aux_alpha: float = 0.0
    bias_update_speed: float = 0.0
    # parallelism over the ranks of `torchrun` (data parallel always; this splits the routed experts too)
    expert_parallel: bool = False
    # GRPO (DeepSeekMath §4.1): batch_size prompts a step, group_size completions each, grpo_mu updates per batch
    group_size: int = 8
    grpo_mu: int = 1
    clip_eps: float = 0.2
    kl_beta: float = 0.04  # DeepSeekMath's beta
    temperature: float = 1.0  # of the rollouts, and of the policy the objective trains
    max_new_tokens: int = 16
    loss_norm: str = "sequence"  # sequence: per sequence then per group (DeepSeekMath); token: over all tokens
    eval_problems: int = 200  # held-out problems whose pass@1 is logged every eval_every steps
    reward_timeout: float = 5.0  # seconds a reward subprocess may run
    reward_memory_mb: int = 512  # its address space
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for f in dataclasses.fields(self):  # types first (a JSON config can hold anything), then ranges
            v = getattr(self, f.name)
            kind = {"int": (is_int, "an integer"), "float": (is_number, "a finite number"),
                    "float | None": (lambda x: x is None or is_number(x), "a finite number or null"),
                    "bool": (lambda x: isinstance(x, bool), "true or false")}.get(f.type)
            if kind is not None:
                check(kind[0](v), f.name, v, f"must be {kind[1]}", owner="train config ")
        check(isinstance(self.model, dict), "model", self.model, "must be an object of ModelConfig fields",
              owner="train config ")
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"), ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
             "must be >= 1 and divide batch_size"),
            ("seq_len", self.seq_len >= 2, "must be >= 2"), ("lr", self.lr > 0, "must be > 0"),
            ("warmup", 0 <= self.warmup <= self.steps, "must lie in [0, steps]"),
            ("schedule", self.schedule in SCHEDULES, f"allowed: {', '.join(SCHEDULES)}"),
            ("dtype", self.dtype in DTYPES, f"allowed: {', '.join(DTYPES)}"),
            ("device", self.device in DEVICES, f"allowed: {', '.join(DEVICES)}"),
            ("clip", self.clip > 0, "must be > 0"), ("keep_last", self.keep_last >= 1, "must be >= 1"),
            ("val_fraction", 0 < self.val_fraction < 1, "must lie in (0, 1)"),
            ("device_limit", 1 <= self.device_limit <= self.n_devices, "must lie in [1, n_devices]"),
            ("init", not (self.sft and self.init is None), "sft=True needs init: the model folder to fine-tune"),
            ("init", not (self.grpo and self.init is None), "grpo=True needs init: the model folder to train"),
            ("grpo", not (self.grpo and self.sft), "grpo and sft are separate stages: run sft, then grpo on its model"),
            ("task", self.task is None or (isinstance(self.task, str) and self.task in TASKS),
             f"unknown task; allowed: {', '.join(sorted(TASKS))}"),
            ("task", not (self.grpo and self.task is None), f"grpo=True needs a task: {', '.join(sorted(TASKS))}"),
            ("task", not (self.task is not None and not (self.sft or self.grpo)),
             "a task is the data of sft or the rewards of grpo; set one of them"),
            ("group_size", self.group_size >= 2, "must be >= 2: GRPO's advantage (r - mean) / std compares the "
             "completions of one prompt, and a group of 1 has none to compare"),
            ("grpo_mu", self.grpo_mu >= 1, "must be >= 1"), ("clip_eps", 0 < self.clip_eps < 1, "must lie in (0, 1)"),
            ("kl_beta", self.kl_beta >= 0, "must be >= 0"),
            ("temperature", self.temperature > 0, "must be > 0 (the policy is softmax(logits / temperature))"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("loss_norm", self.loss_norm in LOSS_NORMS, f"allowed: {', '.join(LOSS_NORMS)}"),
            ("eval_problems", self.eval_problems >= 1, "must be >= 1"),
            ("reward_timeout", self.reward_timeout > 0, "must be > 0"),
            ("reward_memory_mb", self.reward_memory_mb >= 64, "must be >= 64 (Python itself needs some)"),
            ("expert_parallel", not (self.grpo and self.expert_parallel),
             "GRPO's rollouts run the engine over the policy's tensors, which needs whole experts on every rank"),
            ("model", not (self.init is not None and self.model),
             "init brings its own architecture; leave model empty"),
        ]
        for name, ok, allowed in checks:
            check(ok, name, getattr(self, name), allowed, owner="train config ")
        if self.init is None:
            self.model_config()  # the architecture's own checks, now rather than after the tokenizer and data

    def check_world(self, world_size: int) -> None:
        """Raise FieldError unless the batch (and with expert_parallel the experts) split over world_size ranks."""
        micro = self.batch_size // self.grad_accum
        check(micro % world_size == 0, "batch_size", self.batch_size,
              f"batch_size / grad_accum={self.grad_accum} = {micro} sequences per micro-batch must be divisible by "
              f"world_size={world_size}", owner="train config ")
        if self.expert_parallel:
            E = self.model_config().n_routed_experts
            check(bool(E), "expert_parallel", True, "needs a MoE model; n_routed_experts is null (all layers dense)",
                  owner="train config ")
            check(E % world_size == 0, "expert_parallel", True,
                  f"world_size={world_size} must divide n_routed_experts={E}", owner="train config ")

    def model_config(self) -> ModelConfig:
        """The architecture: init's, or model with the tokenizer's vocabulary (the recipe limits routing from
        outside, so this is exactly what is exported)."""
        if self.init is not None:
            return ModelConfig.from_file(self.init)
        m = dict(self.model)
        unknown = sorted(set(m) - {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"})
        check(not unknown, "model", self.model, f"unknown ModelConfig fields: {', '.join(unknown)}",
              owner="train config ")
        m["vocab_size"] = self.vocab_size
        m.setdefault("max_position_embeddings", max(4096, self.seq_len))
        return ModelConfig(**m)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read train config {path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"train config {path} holds {type(d).__name__}, not a JSON object of TrainConfig fields")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"train config {path} has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)


_TINY_MODEL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                   num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=None)
_SMALL_MODEL = dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=2,
                    num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=None)

_DEMO_MODEL = dict(_SMALL_MODEL, num_hidden_layers=6, moe_intermediate_size=96, n_routed_experts=32,
                   num_experts_per_tok=4, max_position_embeddings=2048)

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on 2 cores: tests and smoke runs (on the CPU even beside a GPU: bit-exact resume)
    "tiny": dict(model=_TINY_MODEL, vocab_size=512, seq_len=64, batch_size=8, steps=20, lr=3e-3, warmup=2,
                 eval_every=10, eval_batches=2, save_every=10, max_tokenizer_bytes=2_000_000, device="cpu"),
    # a few million parameters; minutes on 2 cores. Each token's top-2 on 1 of 4 device groups: V2's K/M of 6/3
    "small": dict(model=_SMALL_MODEL, vocab_size=4096, seq_len=256, batch_size=16, steps=600, lr=2e-3,
                  warmup=50, n_devices=4, device_limit=1, alpha1=0.003, alpha2=0.05, alpha3=0.02),
    # the bundled model (openseek/bundled/demo): ~16M parameters, ~3.5M activated; about half an hour on 2 cores
    "demo": dict(model=_DEMO_MODEL, vocab_size=4096, seq_len=512, batch_size=16, steps=800, lr=2e-3,
                 warmup=50, n_devices=4, device_limit=2, alpha1=0.003, alpha2=0.05, alpha3=0.02,
                 eval_every=200, save_every=100),
    # its chat fine-tune: --init OUT/model from the demo run; about one epoch of the standard library's functions
    "demo-sft": dict(sft=True, seq_len=512, batch_size=16, steps=200, lr=5e-4, warmup=20, schedule="cosine",
                     alpha1=0.003, eval_every=50, save_every=50),
    # GRPO (README, docs/grpo.md): a short SFT of the bundled model (--init openseek/bundled) on the task's format,
    # which leaves held-out pass@1 between 5% and 60%, then GRPO from it (--init OUT/model of the SFT run)
    "grpo-sft": dict(sft=True, task="largest", seq_len=256, batch_size=16, steps=50, lr=1e-3, warmup=10,
                     schedule="cosine", eval_every=25, eval_batches=4, save_every=25, device="cpu"),
    "grpo": dict(grpo=True, task="largest", batch_size=16, group_size=8, steps=250, lr=1e-4, warmup=5,
                 schedule="cosine", max_new_tokens=10, eval_every=20, eval_problems=500, save_every=20,
                 device="cpu"),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown train preset {name!r}: allowed: {', '.join(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides})
