"""GRPO's objective (DeepSeekMath §4.1, the RL stage of DeepSeek-V2 §4): group-relative advantages, the clipped
ratio, and the KL penalty to a frozen reference with the unbiased estimator.

For each prompt, G completions o_i with outcome rewards r_i; every token of o_i gets A_i = (r_i - mean(r)) / std(r)
(0 when the group's rewards all tie). Per token t of o_i, with ratio rho = pi(o_it) / pi_old(o_it):

    J_it = min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) - beta * D_it,
    D_it = pi_ref / pi - log(pi_ref / pi) - 1   (>= 0; its expectation under pi is KL(pi || pi_ref))

and the loss is -J averaged per sequence then over sequences ("sequence", the paper's 1/G sum_i 1/|o_i| sum_t), or
over all tokens of the batch ("token", as DAPO and later work). pi is the policy at the rollout temperature:
softmax(logits / T), the distribution the completions were sampled from.

Shapes: B completions (rows), S tokens per row (prompt + completion, right-padded), M completion tokens of the
micro-batch (the rows' masked positions, flattened), D model dim, V vocabulary, P prompts, G completions per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer

LOSS_NORMS = ("sequence", "token")


def group_advantages(rewards_PG: torch.Tensor) -> torch.Tensor:
    """A = (r - mean) / std within each group of G (std with Bessel's correction, as TRL); 0 where all tie."""
    P, G = rewards_PG.shape
    assert G >= 2, "a group needs >= 2 completions (the config refuses group_size < 2)"
    mean = rewards_PG.mean(1, keepdim=True)
    std = rewards_PG.std(1, keepdim=True)
    return torch.where(std > 0, (rewards_PG - mean) / std.clamp(min=torch.finfo(rewards_PG.dtype).tiny), 0.0)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The unbiased per-token estimator of KL(pi || pi_ref) (Schulman's k3): pi_ref/pi - log(pi_ref/pi) - 1."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass(slots=True)
class TokenTerms:
    """Per completion token (M,): the objective J and what the metrics report."""
    objective: torch.Tensor  # J_it, with gradient
    kl: torch.Tensor  # D_it, detached
    clipped: torch.Tensor  # bool: the clipped branch of the min is the one taken (its gradient is 0)


def token_terms(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None, adv: torch.Tensor,
                eps: float, beta: float) -> TokenTerms:
    """J_it for each token (M,) from log-probs under pi (with gradient), pi_old and pi_ref (None when beta = 0)."""
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps, 1 + eps) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp) if logp_ref is None else kl_estimate(logp, logp_ref)
    if beta:
        objective = objective - beta * kl
    return TokenTerms(objective, kl.detach(), (clipped < unclipped).detach())


def grpo_loss(objective_M: torch.Tensor, row_M: torch.Tensor, norm: str, n_rows: int, n_tokens: int) -> torch.Tensor:
    """-J of a micro-batch, normalised over the whole batch so that micro-batches' losses add up to the batch's:
    "sequence": sum over rows of (row's mean J) / n_rows; "token": sum of J / n_tokens. row_M: each token's row."""
    if norm == "token":
        return -objective_M.sum() / n_tokens
    assert norm == "sequence", f"loss_norm {norm!r}: allowed {LOSS_NORMS}"
    B = int(row_M.max()) + 1 if row_M.numel() else 0
    per_row = objective_M.new_zeros(B).index_add(0, row_M, objective_M)  # (B,)
    length = torch.bincount(row_M, minlength=B).clamp(min=1)  # (B,)
    return -(per_row / length).sum() / n_rows


@dataclass(slots=True)
class Rows:
    """A micro-batch of completions: tokens (B, S) = prompt + completion, right-padded with 0; mask (B, S - 1) True
    where target tokens[:, 1:] is a completion token; adv (B,) each row's advantage."""
    tokens: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    prompt_lengths: list[int]

    @property
    def row_M(self) -> torch.Tensor:
        """(M,) the row of each completion token, in mask order."""
        return self.mask.nonzero()[:, 0]


@dataclass(slots=True)
class LogProbs:
    logp: torch.Tensor  # (M,) log pi(o_t) at the temperature, with gradient
    logp_raw: torch.Tensor  # (M,) log softmax(logits) of the same tokens: what the engine reports, detached
    entropy: torch.Tensor  # (M,) entropy of pi at each position, detached


def completion_logprobs(model: Transformer, rows: Rows, temperature: float, dtype: torch.dtype) -> LogProbs:
    """Log-probs of the completion tokens under `model`; the output head runs on the M completion positions only."""
    tokens, mask = rows.tokens.to(model.device), rows.mask.to(model.device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, S-1)
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        h_M = model.hidden_states(x)[mask]  # (M, D)
        logits = model.head(h_M).float()  # (M, V)
    target = y[mask][:, None]  # (M, 1)
    logp_all = torch.log_softmax(logits / temperature, -1)  # (M, V)
    logp = logp_all.gather(1, target)[:, 0]
    with torch.no_grad():
        logp_raw = logp if temperature == 1 else torch.log_softmax(logits, -1).gather(1, target)[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return LogProbs(logp, logp_raw.detach(), entropy)
