"""A request's token state as the scheduler sees it. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .block_pool import block_hash


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # compared by identity: two completions of one request can hold equal fields
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # generated tokens allowed (after max_model_len is applied)
    index: int = 0  # which of the request's n completions
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the full blocks so far
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at the last admission
    arrival: int = 0  # admission order, kept across preemption so nobody starves
    needs_all_logits: bool = False  # prompt logprobs: compute every prompt token, no prefix-cache hits
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def hashes_through(self, num_tokens: int, block_size: int) -> list[bytes]:
        """Chained hashes of every full block within the first num_tokens tokens (extends the memo)."""
        full = num_tokens // block_size
        ids = None
        while len(self.block_hashes) < full:
            ids = ids or self.token_ids
            k = len(self.block_hashes)
            parent = self.block_hashes[-1] if k else None
            self.block_hashes.append(block_hash(parent, ids[k * block_size:(k + 1) * block_size]))
        return self.block_hashes[:full]
