"""Rollouts for GRPO: the prompts of each step, the sampler that completes them, and the rows the update trains on.

The sampler is the inference engine over the policy's own parameter tensors (openseek.LLM; cli/train.py builds it,
since train code does not import the engine): train code sees only the `Sampler` protocol below.

Shapes: B completions (rows), S tokens per row (prompt + completion, right-padded with 0), P prompts, G completions
per prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..model import Transformer
from ..tokenizer import Tokenizer
from .grpo import Rows


@dataclass(slots=True)
class Completion:
    token_ids: list[int]  # sampled tokens, the EOS that ended it included
    logprobs: list[float]  # the engine's log-prob of each sampled token (log softmax of its logits, temperature 1)
    text: str  # detokenized, special tokens skipped: what the reward program reads


class Sampler(Protocol):
    """What GRPO needs of an inference engine running over the policy's own tensors."""

    def sample(self, prompts: list[list[int]], seeds: list[int], n: int, temperature: float,
               max_tokens: int) -> list[list[Completion]]:
        """n completions of each prompt, completion j of prompt k drawn with seed seeds[k] + j (temperature 0:
        greedy)."""
        ...

    def renew_weights(self) -> None:
        """Renew what the engine derives from the weights (MLA's absorbed W_UK / W_UV, cached prefixes) after an
        optimizer step changed them in place."""
        ...


# (model, tokenizer, max_model_len, max_num_seqs) -> a Sampler over that model
SamplerFactory = Callable[[Transformer, Tokenizer, int, int], Sampler]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The user turn rendered through the chat template with the generation prompt, as SFT trains and serving
    renders it (sft.tokenize_example)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def rollout_seed(seed: int, position: int) -> int:
    """The sampling seed of the run's position-th prompt: a function of (seed, position) alone, so a resumed run, or
    one on any number of ranks, draws the same completions."""
    return random.Random(f"grpo-rollout:{seed}:{position}").getrandbits(62)


class PromptLoader:
    """Each step's batch_size prompts, without replacement in a seeded order per epoch; rank r of W takes the r-th
    slice. Its state is the count of prompts served, run-wide."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = num_prompts, batch_size, seed, rank, world_size
        self.position = 0

    def next(self) -> list[tuple[int, int]]:
        """(problem index, run-wide position) of this rank's prompts of the next step."""
        per_rank = self.batch // self.world
        first = self.position + self.rank * per_rank
        self.position += self.batch
        return [(self._order(p // self.n)[p % self.n], p) for p in range(first, first + per_rank)]

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"grpo-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def build_rows(prompts: list[list[int]], groups: list[list[Completion]], adv_PG: torch.Tensor,
               chunks: int) -> list[tuple[Rows, torch.Tensor]]:
    """The completions as `chunks` micro-batches of whole groups: (Rows, the engine's log-probs (M,) of their
    completion tokens in mask order)."""
    rows = [(p + c.token_ids, len(p), c.logprobs, float(adv_PG[k, j]))
            for k, (p, group) in enumerate(zip(prompts, groups)) for j, c in enumerate(group)]
    per = len(rows) // chunks
    out = []
    for part in (rows[i * per:(i + 1) * per] for i in range(chunks)):
        S = max(len(ids) for ids, *_ in part)
        tokens = torch.zeros(len(part), S, dtype=torch.int64)
        mask = torch.zeros(len(part), S - 1, dtype=torch.bool)
        for b, (ids, n_prompt, _, _) in enumerate(part):
            tokens[b, :len(ids)] = torch.tensor(ids)
            mask[b, n_prompt - 1:len(ids) - 1] = True  # target j + 1 is a completion token
        sampled = torch.tensor([lp for _, _, lps, _ in part for lp in lps], dtype=torch.float32)
        adv = torch.tensor([a for *_, a in part])
        out.append((Rows(tokens, mask, adv, [n for _, n, _, _ in part]), sampled))
    return out
