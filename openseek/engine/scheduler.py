"""Continuous batching under a per-step token budget. Pure Python, no torch.

Each step: running sequences first, in admission order (decodes and unfinished prefill chunks), then
waiting ones in FIFO order while the budget, `max_num_seqs` and free blocks allow. A long prompt is
prefilled in chunks of at most the remaining budget. When a running sequence needs a block and none is
free, the most recently admitted sequence is preempted: its blocks are released (they stay in the prefix
cache) and it is recomputed later from the front of the queue, so nobody starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_pool import BlockPool
from .sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # decodes first, then prefill chunks
    num_new: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    samples: list[bool] = field(default_factory=list)  # reaches its last known token, so samples the next one
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool, self.block_size = pool, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        seq.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        out, budget = ScheduledBatch(), self.max_num_batched_tokens
        decodes, prefills = [], []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or out of budget
            need = seq.num_tokens - seq.num_computed
            n = min(need, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                (decodes if need == 1 else prefills).append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break  # the head of the queue waits for blocks; later arrivals may not overtake it
            prefills.append((self.waiting.popleft(), n))
            budget -= n
        for seq, n in decodes + prefills:
            out.seqs.append(seq)
            out.num_new.append(n)
            out.samples.append(seq.num_computed + n == seq.num_tokens)
        out.num_decodes = len(decodes)
        return out

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        extra = self._blocks_for(num_tokens) - len(seq.block_table)
        if extra > self.pool.num_free:
            return False
        if extra > 0:
            seq.block_table += self.pool.allocate(extra)
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for its first chunk; 0 if it must wait."""
        # At least one token is always computed: its logits give the next token.
        hashes = seq.hashes_through(seq.num_tokens - 1, self.block_size)
        hits, free_hits = (0, 0) if seq.needs_all_logits else self.pool.count_hits(hashes)
        cached = hits * self.block_size
        n = min(seq.num_tokens - cached, budget)
        fresh = self._blocks_for(cached + n) - hits
        if fresh + free_hits > self.pool.num_free:
            return 0
        seq.block_table = self.pool.lookup(hashes[:hits]) + self.pool.allocate(fresh)
        seq.num_computed = seq.num_cached_prompt = cached
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.status = [], 0, Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and publish newly filled blocks to the prefix cache."""
        for seq, n in zip(batch.seqs, batch.num_new):
            before = seq.num_computed // self.block_size
            seq.num_computed += n
            hashes = seq.hashes_through(seq.num_computed, self.block_size)
            for k in range(before, len(hashes)):
                self.pool.register(seq.block_table[k], hashes[k])

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (stopped, finished, or aborted) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)
        seq.block_table, seq.status, seq.finish_reason = [], Status.FINISHED, reason
