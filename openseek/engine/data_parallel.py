"""Data-parallel attention's bookkeeping on rank 0: one scheduler and block pool per data-parallel group. Pure
Python, no torch.

Each group of ranks caches the latents of its own sequences only, so each has its own BlockPool (its ranks' cache
rows) and Scheduler; a sequence joins the group with the fewest unfinished sequences and stays there (its latents
are in that group's cache; preemption recomputes it there too). Every step each group schedules its own batch
under the full budgets, and the groups' batches, concatenated, are the step's batch: the engine sees one
scheduler and one pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_pool import BlockPool
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence


@dataclass(slots=True)
class DataParallelBatch(ScheduledBatch):
    parts: list[ScheduledBatch] = field(default_factory=list)  # per group, in group order: seqs is their concat


class Pools:
    """The groups' pools as the engine's one pool (stats, prefix-cache reset)."""

    def __init__(self, pools: list[BlockPool]):
        self.pools = pools

    @property
    def num_blocks(self) -> int:
        return sum(p.num_blocks for p in self.pools)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    @property
    def ref_count(self) -> list[int]:
        return [c for p in self.pools for c in p.ref_count]

    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def reset_prefix_cache(self) -> None:
        for p in self.pools:
            p.reset_prefix_cache()


class DataParallelScheduler:
    """Scheduler's interface over one Scheduler per group."""

    def __init__(self, groups: list[Scheduler]):
        self.groups = groups
        self._group_of: dict[Sequence, int] = {}  # its group, while it is unfinished (sequences hash by identity)

    @property
    def waiting(self) -> list[Sequence]:
        return [seq for g in self.groups for seq in g.waiting]

    @property
    def running(self) -> list[Sequence]:
        return [seq for g in self.groups for seq in g.running]

    def add(self, seq: Sequence) -> None:
        load = [len(g.waiting) + len(g.running) for g in self.groups]
        k = load.index(min(load))
        self._group_of[seq] = k
        self.groups[k].add(seq)

    def has_unfinished(self) -> bool:
        return any(g.has_unfinished() for g in self.groups)

    def schedule(self) -> DataParallelBatch:
        out = DataParallelBatch(parts=[g.schedule() for g in self.groups])
        for part in out.parts:
            out.seqs += part.seqs
            out.num_new += part.num_new
            out.samples += part.samples
            out.preempted += part.preempted
        out.num_decodes = sum(part.num_decodes for part in out.parts)  # a count only: decodes are not all first
        return out

    def after_step(self, batch: DataParallelBatch) -> None:
        for g, part in zip(self.groups, batch.parts):
            g.after_step(part)

    def finish(self, seq: Sequence, reason: str) -> None:
        k = self._group_of.pop(seq, None)
        if k is not None:
            self.groups[k].finish(seq, reason)


def data_parallel_scheduler(groups: int, num_blocks: int, enable_prefix_caching: bool, block_size: int,
                            max_num_seqs: int, max_num_batched_tokens: int) -> tuple[Pools, DataParallelScheduler]:
    """`groups` pools of num_blocks each, and their schedulers."""
    pools = [BlockPool(num_blocks, enable_prefix_caching) for _ in range(groups)]
    return Pools(pools), DataParallelScheduler([Scheduler(p, block_size, max_num_seqs, max_num_batched_tokens)
                                                for p in pools])
