"""One training step and evaluation: AdamW with the V2 schedule, the MoE recipe's losses, gradient clipping.

Shapes: B sequences per micro-batch, S tokens per sequence, D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..model import Transformer
from ..model.moe import MoE
from .config import TrainConfig
from .loss import IGNORE_INDEX, linear_cross_entropy
from .moe_recipe import MoERecipe


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then step decay x0.316 at 60% and 90% of the steps (V2) or cosine to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return cfg.lr * 0.316 ** ((step >= 0.6 * cfg.steps) + (step >= 0.9 * cfg.steps))


def init_weights(model: Transformer, std: float, seed: int) -> None:
    """Normal(0, std) for matrices, ones for norms, zeros for the router bias (V2 paper: std 0.006)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (norm weights are vectors); the fused kernel, much faster than the loop. The
    routed experts form a group of their own: the fused kernel refuses their DTensors (expert parallelism) mixed with
    plain tensors in one call, and the groups must be the same at every world size for checkpoints to resume
    anywhere."""
    experts = [p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]
    expert_ids = {id(p) for p in experts}
    rest = [p for p in model.parameters() if id(p) not in expert_ids]
    decay, no_decay = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in
              ((decay, cfg.weight_decay), (experts, cfg.weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def build_recipe(cfg: TrainConfig) -> MoERecipe:
    return MoERecipe(alpha1=cfg.alpha1, alpha2=cfg.alpha2, alpha3=cfg.alpha3, n_devices=cfg.n_devices,
                     device_limit=cfg.device_limit, capacity_factor=cfg.capacity_factor,
                     drop_exempt_fraction=cfg.drop_exempt_fraction, seq_aux_alpha=cfg.seq_aux_alpha,
                     bias_update_speed=cfg.bias_update_speed)


@dataclass(slots=True)
class StepResult:
    loss: float  # the LM loss alone
    aux: dict[str, float]
    grad_norm: float
    tokens: int


def lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean cross-entropy of the next tokens y (B, S) after x (B, S); the head fused with the loss (loss.py)."""
    x, y = x.to(model.device), y.to(model.device)
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        h = model.hidden_states(x)  # (B, S, D)
        return linear_cross_entropy(h.flatten(0, 1), model.head.weight, y.flatten())


class LMLoss(nn.Module):
    """lm_loss as a module of its own: data parallelism (DDP) hooks a module's forward."""

    def __init__(self, model: Transformer, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.model, x, y, self.dtype)


class Parallel(Protocol):
    """What a multi-rank step needs (distributed.DataParallel): the loss with gradient sync on or off, the gradients
    finished after backward, the norm clipped over all ranks, and the rank and world size (rows' run-wide numbers)."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor: ...

    def finish_grads(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...


def train_step(model: Transformer, opt: torch.optim.Optimizer, recipe: MoERecipe, micro_batches: list,
               cfg: TrainConfig, lr: float, dtype: torch.dtype, parallel: Parallel | None = None) -> StepResult:
    """One optimizer step over grad_accum micro-batches; with `parallel`, over this rank's rows of them."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total, aux_sums, tokens = 0.0, {}, 0
    rank, ranks = (0, 1) if parallel is None else (parallel.rank, parallel.size)
    rows = sum(x.shape[0] for x, _ in micro_batches)
    first = recipe.sequences + rank * rows  # run-wide index of this rank's first row (the loader's layout)
    for i, (x, y) in enumerate(micro_batches):
        recipe.reset(first)
        first += x.shape[0]
        loss = lm_loss(model, x, y, dtype) if parallel is None else parallel.loss(x, y, i == len(micro_batches) - 1)
        aux = recipe.step_losses()
        (loss + sum(aux.values(), loss.new_zeros(()))).div(len(micro_batches)).backward()
        total += loss.item() / len(micro_batches)
        for k, v in aux.items():
            aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / len(micro_batches)
        tokens += y.numel()
    if parallel is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=False).item()
    else:
        parallel.finish_grads()
        grad_norm = parallel.clip_grad_norm(cfg.clip)
    opt.step()
    recipe.update_bias(model)
    recipe.sequences += rows * ranks
    return StepResult(total, aux_sums, grad_norm, tokens)


@torch.no_grad()
def evaluate(model: Transformer, batches, dtype: torch.dtype) -> tuple[float, int]:
    """(mean LM loss in nats per token, tokens) over the given batches, in eval mode (no dropping)."""
    model.eval()
    nats, n = 0.0, 0
    for x, y in batches:
        n_valid = int((y != IGNORE_INDEX).sum())  # the last validation batch is padded with ignored targets
        loss = lm_loss(model, x, y, dtype)  # even when all padding: expert parallelism needs every rank's forward
        if n_valid:
            nats += loss.item() * n_valid
            n += n_valid
    model.train()
    return nats / max(n, 1), n
