"""Block pool and scheduler on their own: pure Python, no model."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from openseek.engine.block_pool import BlockPool, block_hash
from openseek.engine.scheduler import Scheduler
from openseek.engine.sequence import Sequence, Status


def make(pool_blocks=16, block_size=4, max_num_seqs=8, budget=64, prefix=True):
    pool = BlockPool(pool_blocks, prefix)
    return pool, Scheduler(pool, block_size, max_num_seqs, budget)


def run_step(sched: Scheduler, next_token=7):
    """Schedule, 'compute', and append a token to every sequence that samples (finishing at max_tokens)."""
    batch = sched.schedule()
    samplers = [s for i, s in enumerate(batch.seqs) if batch.samples[i]]
    sched.after_step(batch)
    for seq in samplers:
        seq.output_ids.append(next_token)
        if len(seq.output_ids) >= seq.max_tokens:
            sched.finish(seq, "length")
    return batch


def test_pool_refcounts_and_prefix_lookup():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"111")
    assert pool.num_free == 2
    assert pool.lookup([b"111", b"222"]) == [a[0]]  # only the leading hit
    assert pool.ref_count[a[0]] == 2
    pool.release(a)
    pool.release([a[0]])
    assert pool.num_free == 4
    assert pool.lookup([b"111"]) == [a[0]]  # a freed block stays findable until reused
    pool.release([a[0]])
    pool.allocate(4)  # reuse evicts its hash
    assert pool.cached == {}


def test_an_empty_pool_reports_zero_usage():
    assert BlockPool(0).usage() == 0.0  # was a ZeroDivisionError


def test_allocating_more_than_free_raises():
    with pytest.raises(RuntimeError, match="cannot allocate 5 blocks: 4 free"):
        BlockPool(4).allocate(5)


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    pool, sched = make(pool_blocks=32, budget=10)
    seq = Sequence("a", list(range(25)), max_tokens=2)
    sched.add(seq)
    chunks = []
    while sched.has_unfinished():
        batch = run_step(sched)
        chunks.append(batch.num_new[0])
    assert chunks == [10, 10, 5, 1]  # three prefill chunks, then one decode
    assert pool.num_free == 32


def test_decodes_come_first_and_budget_is_shared():
    pool, sched = make(pool_blocks=64, budget=8)
    a = Sequence("a", [1, 2, 3], max_tokens=5)
    sched.add(a)
    run_step(sched)  # a's prefill
    b = Sequence("b", list(range(20)), max_tokens=1)
    sched.add(b)
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_decodes == 1
    assert batch.num_new == [1, 7]


def test_max_num_seqs_limits_running():
    _, sched = make(pool_blocks=64, max_num_seqs=2)
    for i in range(4):
        sched.add(Sequence(str(i), [1, 2, 3], max_tokens=3))
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and len(sched.waiting) == 2


def test_prefix_hit_reuses_full_blocks_only():
    pool, sched = make(pool_blocks=16, block_size=4)
    first = Sequence("a", list(range(10)), max_tokens=1)
    sched.add(first)
    run_step(sched)
    second = Sequence("b", list(range(9)) + [99, 98], max_tokens=1)
    sched.add(second)
    batch = sched.schedule()
    # blocks [0..3] and [4..7] are shared; token 8 onward is recomputed
    assert second.num_cached_prompt == 8 and batch.num_new == [3]
    assert second.block_table[:2] == first_blocks(pool, 2)


def test_blocks_whose_python_hashes_collide_are_not_confused():
    # hash(-1) == hash(-2) in CPython, so hash((parent, tokens)), the old block hash, is equal for these two
    # blocks, and the second prompt was served the first one's cache
    assert hash((None, (-1,) * 4)) == hash((None, (-2,) * 4))
    pool, sched = make(block_size=4)
    sched.add(Sequence("a", [-1] * 4 + [5], max_tokens=1))
    run_step(sched)
    other = Sequence("b", [-2] * 4 + [5], max_tokens=1)
    sched.add(other)
    assert sched.schedule().num_new == [5] and other.num_cached_prompt == 0


def test_block_hash_is_sha256_chained_over_the_token_ids():
    ids = [[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8]]
    seq = Sequence("a", sum(ids, []) + [9], max_tokens=1)
    want, parent = [], bytes(32)  # the root's parent: 32 zero bytes
    for block in ids:
        parent = hashlib.sha256(parent + array("q", block).tobytes()).digest()
        want.append(parent)
    assert seq.hashes_through(13, 4) == want
    assert block_hash(None, (2**40, 7)) != block_hash(None, (7, 2**40)) and len(want[0]) == 32


def first_blocks(pool: BlockPool, n: int) -> list[int]:
    return sorted(pool.cached.values())[:n]


def test_identical_prompt_still_computes_its_last_token():
    pool, sched = make(block_size=4)
    sched.add(Sequence("a", list(range(8)), max_tokens=1))
    run_step(sched)
    seq = Sequence("b", list(range(8)), max_tokens=1)
    sched.add(seq)
    batch = sched.schedule()
    assert seq.num_cached_prompt == 4 and batch.num_new == [4]  # the full prompt is never all cached


def test_preemption_recomputes_and_pool_refills():
    pool, sched = make(pool_blocks=6, block_size=4, budget=64)
    seqs = [Sequence(str(i), list(range(i * 10, i * 10 + 7)), max_tokens=12) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        preempted += len(run_step(sched).preempted)
    assert not sched.has_unfinished()
    assert preempted > 0  # 3 x 19 tokens cannot fit in 24 slots at once
    assert all(s.status is Status.FINISHED and len(s.output_ids) == 12 for s in seqs)
    assert pool.num_free == 6 and all(c == 0 for c in pool.ref_count)


def test_waiting_head_is_not_overtaken():
    pool, sched = make(pool_blocks=4, block_size=4, budget=64)
    big = Sequence("big", list(range(14)), max_tokens=1)  # needs all 4 blocks
    small_running = Sequence("run", [1, 2], max_tokens=3)
    sched.add(small_running)
    run_step(sched)
    sched.add(big)
    sched.add(Sequence("small", [5], max_tokens=1))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["run"]  # big waits for blocks, small may not jump it


def test_finish_of_waiting_sequence_frees_nothing_twice():
    pool, sched = make()
    seq = Sequence("a", [1, 2, 3], max_tokens=4)
    sched.add(seq)
    sched.finish(seq, "abort")
    assert not sched.has_unfinished() and pool.num_free == 16
