"""Serving over 2 processes on gloo (tensor + expert parallel) against the one-process engine, on tiny V2 / V3
checkpoints written by transformers; a lost worker, and sizes that do not split the model."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from conftest import build_reference, save_reference
from openseek import LLM, SamplingParams
from openseek.model.parallel import Layout, shard

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SMALL = dict(block_size=4, kv_cache_memory=1 << 20, max_model_len=256)  # a small cache: 2 processes hold one each


def prompts(n=8, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist()} for i in range(n)]


def shared_prefix_prompts():
    shared = prompts(1, seed=5)[0]["prompt_token_ids"] * 3  # 9 tokens: 2 full blocks of 4
    return [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts(4, seed=6)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def pool_whole(engine) -> bool:
    return engine.pool.num_free == engine.pool.num_blocks and all(c == 0 for c in engine.pool.ref_count)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return save_reference(build_reference("v2"), tmp_path_factory.mktemp("par") / "v2")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return save_reference(build_reference("v3", q_lora_rank=24), tmp_path_factory.mktemp("par") / "v3")


def one_process(path):
    """The reference: greedy tokens of the one-process engine for the 8 prompts and the shared-prefix ones."""
    llm = LLM(path, **SMALL)
    return tokens(llm.generate(prompts(), GREEDY)), tokens(llm.generate(shared_prefix_prompts(), GREEDY))


def check_against_one_process(llm, path):
    """8 batched prompts under a budget that chunks their prefills, then prefix-cache hits: the same tokens."""
    want, want_shared = one_process(path)
    assert tokens(llm.generate(prompts(), GREEDY)) == want
    assert tokens(llm.generate(shared_prefix_prompts(), GREEDY)) == want_shared
    again = llm.generate(shared_prefix_prompts(), GREEDY)
    assert all(o.num_cached_tokens >= 8 for o in again)
    assert tokens(again) == want_shared
    assert pool_whole(llm.llm_engine)


def test_expert_parallel_v2_matches_one_process_with_chunks_prefix_hits_and_abort(v2):
    llm = LLM(v2, tensor_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=16, **SMALL)
    try:
        check_against_one_process(llm, v2)
        engine = llm.llm_engine
        for i, p in enumerate(prompts(4, seed=3)):
            engine.add_request(f"r{i}", p, GREEDY)
        for _ in range(3):
            engine.step()
        engine.abort("r1")
        engine.abort("r2")
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.output) for o in engine.step() if o.output is not None)
        assert set(done) == {"r0", "r3"} and pool_whole(engine)
        want = tokens(LLM(v2, **SMALL).generate([prompts(4, seed=3)[k] for k in (0, 3)], GREEDY))
        assert [done["r0"].outputs[0].token_ids, done["r3"].outputs[0].token_ids] == want
        stats = engine.runner.worker_stats()
        full = LLM(v2, **SMALL).llm_engine.model
        full_experts = sum(p.numel() * 4 for n, p in full.named_parameters() if ".experts." in n)
        assert [s["routed_experts"] for s in stats] == [full_experts // 2] * 2
        assert stats[0]["cache"] == stats[1]["cache"] == engine.runner.cache_bytes  # the latent cache: replicated
    finally:
        llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in llm.llm_engine.runner.workers.procs)


def test_tensor_parallel_v3_with_split_expert_hidden_matches_one_process(v3):
    llm = LLM(v3, tensor_parallel_size=2, max_num_batched_tokens=16, **SMALL)
    try:
        check_against_one_process(llm, v3)
        stats = llm.llm_engine.runner.worker_stats()
        full = LLM(v3, **SMALL).llm_engine.model
        full_experts = sum(p.numel() * 4 for n, p in full.named_parameters() if ".experts." in n)
        assert [s["routed_experts"] for s in stats] == [full_experts // 2] * 2  # every expert's F split in 2
        assert stats[0]["weights"] == stats[1]["weights"] < 0.8 * sum(p.numel() * 4 for p in full.parameters())
    finally:
        llm.llm_engine.shutdown()


def test_data_parallel_attention_v2_matches_one_process_with_a_cache_per_group(v2):
    llm = LLM(v2, data_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=16, **SMALL)
    try:
        engine = llm.llm_engine
        for i, p in enumerate(prompts(4, seed=3)):
            engine.add_request(f"r{i}", p, GREEDY)
        engine.step()
        assert [len(g.running) for g in engine.scheduler.groups] == [2, 2]  # each group attends over its own
        assert engine.token_capacity == 2 * engine.runner.kv_cache[0].shape[0]  # two caches, one per group
        engine.abort("r1")
        while engine.has_unfinished_requests():
            engine.step()
        check_against_one_process(llm, v2)
        logged = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)  # every prompt token's logits
        one = LLM(v2, max_num_batched_tokens=16, **SMALL)
        for got, want in zip(llm.generate(prompts(4, seed=8), logged), one.generate(prompts(4, seed=8), logged)):
            for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
                assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-4 for t in w)
        stats = engine.runner.worker_stats()
        full = one.llm_engine.model
        full_experts = sum(p.numel() * 4 for n, p in full.named_parameters() if ".experts." in n)
        assert [s["routed_experts"] for s in stats] == [full_experts // 2] * 2
    finally:
        llm.llm_engine.shutdown()


def test_four_ranks_two_groups_of_two_heads_each_match_one_process(v3):
    llm = LLM(v3, tensor_parallel_size=2, data_parallel_size=2, max_num_batched_tokens=16, **SMALL)
    try:
        assert tokens(llm.generate(prompts(), GREEDY)) == one_process(v3)[0]
        assert len(llm.llm_engine.runner.worker_stats()) == 4
    finally:
        llm.llm_engine.shutdown()


def test_a_killed_worker_fails_the_requests_and_stops_the_server_loop(v2):
    from openseek.server.async_engine import AsyncEngine, EngineFailed

    llm = LLM(v2, tensor_parallel_size=2, enable_expert_parallel=True, **SMALL)
    engine = llm.llm_engine
    engine.add_request("a", prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.healthy
    worker = engine.runner.workers.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    assert not engine.healthy  # seen before any step: the server's /health answers 503 at once
    start = time.monotonic()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finish_reason == "error" and "worker rank 1" in outs[-1].output.error
    again = llm.generate(prompts(1)[0], GREEDY)[0]  # fails at once, names the cause
    assert again.outputs[0].finish_reason == "error" and "exited with code -9" in again.error
    assert time.monotonic() - start < 10

    async def serve_one():
        server = AsyncEngine(engine)
        server.start()
        deltas = await server.add([("b", prompts(1)[0], GREEDY)])
        got = await asyncio.wait_for(deltas.get(), 10)
        for _ in range(100):
            if not server.alive:
                break
            await asyncio.sleep(0.1)
        assert not server.alive  # the loop stopped: /health answers 503 and the server exits
        with pytest.raises(EngineFailed):
            await server.add([("c", prompts(1)[0], GREEDY)])
        return got
    got = asyncio.run(serve_one())
    assert got.finish_reason == "error" and "worker rank 1" in got.output.error
    engine.shutdown()


def test_a_worker_that_fails_is_reported_with_its_error(v2):
    llm = LLM(v2, tensor_parallel_size=2, **SMALL)
    engine = llm.llm_engine
    try:
        engine.runner.workers.send(("step", None))  # a step the worker cannot run: it reports, then exits
        engine.runner.workers.procs[0].join(timeout=30)
        out = llm.generate(prompts(1)[0], GREEDY)[0]
        assert out.outputs[0].finish_reason == "error"
        assert "worker rank 1 exited with code 1 after failing: AttributeError" in out.error
    finally:
        engine.shutdown()


def test_int8_quantised_per_rank_matches_one_process_int8(v2):
    want = tokens(LLM(v2, quantization="int8", **SMALL).generate(prompts(), GREEDY))
    llm = LLM(v2, tensor_parallel_size=2, enable_expert_parallel=True, quantization="int8", **SMALL)
    try:
        assert tokens(llm.generate(prompts(), GREEDY)) == want
    finally:
        llm.llm_engine.shutdown()


def test_a_stalled_worker_times_out_instead_of_hanging(v2):
    llm = LLM(v2, tensor_parallel_size=2, distributed_timeout=3, **SMALL)
    engine = llm.llm_engine
    worker = engine.runner.workers.procs[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        out = llm.generate(prompts(1)[0], GREEDY)[0]
        assert out.outputs[0].finish_reason == "error" and "tensor-parallel serving stopped" in out.error
        assert time.monotonic() - start < 30
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        engine.shutdown()


def test_sizes_that_do_not_split_the_model_are_refused_at_start(v2, tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 is invalid: must divide num_attention_heads=4"):
        LLM(v2, tensor_parallel_size=3)
    six = save_reference(build_reference("v2", n_routed_experts=6), tmp_path / "six")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 is invalid: must divide n_routed_experts=6 under "
                                         r"enable_expert_parallel"):
        LLM(six, tensor_parallel_size=4, enable_expert_parallel=True)
    odd = save_reference(build_reference("v2", moe_intermediate_size=33), tmp_path / "odd")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 is invalid: must divide moe_intermediate_size=33 "):
        LLM(odd, tensor_parallel_size=2)
    LLM(odd, tensor_parallel_size=2, enable_expert_parallel=True, **SMALL).llm_engine.shutdown()  # whole experts
    dense = save_reference(build_reference("v2", intermediate_size=95), tmp_path / "dense")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 is invalid: must divide intermediate_size=95 "):
        LLM(dense, tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"data_parallel_size=4 is invalid: must divide n_routed_experts=6 \(x "
                                         r"tensor_parallel_size=1: 4 ranks\) under enable_expert_parallel"):
        LLM(six, data_parallel_size=4, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"data_parallel_size=3 is invalid: must divide the shared experts' hidden "
                                         r"size 64"):
        LLM(v2, data_parallel_size=3, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"compile=True is invalid: is not supported with more than one process"):
        LLM(v2, data_parallel_size=2, compile=True)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0 is invalid"):
        LLM(v2, tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 is invalid: needs a model folder"):
        LLM(LLM(v2, **SMALL).llm_engine.model, tensor_parallel_size=2)


def test_a_rank_reads_exactly_its_slices_of_the_checkpoint(v3):
    """load_pretrained with a layout (slices read from the file) equals slicing the loaded full model."""
    from openseek.model import load_pretrained

    full = load_pretrained(v3)
    for ep in (False, True):
        for rank in (0, 1):
            layout = Layout(rank, 2, ep)
            part = load_pretrained(v3, layout=layout, reduce=lambda t: None)
            sliced = load_pretrained(v3)
            shard(sliced, layout, lambda t: None)
            got, want = part.state_dict(), sliced.state_dict()
            assert got.keys() == want.keys() == full.state_dict().keys()
            for name, t in want.items():
                torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)
            experts = full.layers[1].ffn.experts.w2  # (E, D, F)
            mine = part.layers[1].ffn.experts.w2
            want_w2 = experts[4 * rank:4 * rank + 4] if ep else experts[..., 16 * rank:16 * rank + 16]
            assert torch.equal(mine, want_w2)
            wo = full.layers[0].attn.wo.weight  # (D, H * U): this rank's 2 heads' input columns
            assert torch.equal(part.layers[0].attn.wo.weight, wo[:, 32 * rank:32 * rank + 32])
            assert part.layers[0].attn.n_heads == 2


def test_cli_generate_with_tensor_and_expert_parallel_flags_gives_the_same_text():
    import subprocess
    import sys

    import openseek
    want = LLM(openseek.BUNDLED_MODEL, dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=8))
    run = subprocess.run([sys.executable, "-m", "openseek", "generate", "--tensor-parallel-size", "2",
                          "--enable-expert-parallel", "--max-tokens", "8", "Hello"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == want[0].outputs[0].text + "\n"
    bad = subprocess.run([sys.executable, "-m", "openseek", "generate", "--tensor-parallel-size", "3", "Hello"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tensor_parallel_size=3 is invalid: must divide num_attention_heads=4" in bad.stderr


@pytest.mark.parametrize("ep", [True, False])
def test_a_rank_reads_only_the_bytes_of_its_part(v2, monkeypatch, ep):
    """Bytes read from the checkpoint by rank 1 of 2 are its parameters' bytes: other ranks' experts and slices
    are never read."""
    from openseek.model import load_pretrained, weights

    read = [0]
    original = weights._Shard._read

    def counting(self, name, view, offset):
        read[0] += len(view)
        return original(self, name, view, offset)
    monkeypatch.setattr(weights._Shard, "_read", counting)
    full = load_pretrained(v2)
    full_bytes, read[0] = read[0], 0
    part = load_pretrained(v2, layout=Layout(1, 2, ep), reduce=lambda t: None)
    own = sum(t.numel() * t.element_size() for t in part.state_dict().values())
    assert read[0] == own < 0.75 * full_bytes
    assert full_bytes == sum(t.numel() * t.element_size() for t in full.state_dict().values())


def test_torchrun_launched_ranks_serve_rank_0_and_exit():
    """`torchrun --nproc-per-node 2 -m openseek generate --tensor-parallel-size 2`: rank 0 prints the one-process
    text, rank 1 serves it as a worker, and both exit 0."""
    import shutil
    import subprocess

    import openseek
    want = LLM(openseek.BUNDLED_MODEL, dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=8))
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "openseek", "generate",
                          "--tensor-parallel-size", "2", "--enable-expert-parallel", "--max-tokens", "8", "Hello"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == want[0].outputs[0].text + "\n"


def test_data_parallel_scheduler_keeps_each_sequence_in_its_groups_pool():
    from openseek.engine.data_parallel import data_parallel_scheduler
    from openseek.engine.sequence import Sequence

    pools, scheduler = data_parallel_scheduler(2, 4, True, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(f"r{i}", list(range(10 * i, 10 * i + 5)), max_tokens=4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert [p.seqs for p in batch.parts] == [[seqs[0], seqs[2]], [seqs[1]]]  # the least-loaded group each time
    assert batch.seqs == seqs[0::2] + seqs[1:2] and batch.num_new == [5, 5, 5]
    assert [p.num_free for p in pools.pools] == [0, 2] and pools.num_free == 2 and pools.num_blocks == 8
    scheduler.after_step(batch)
    scheduler.finish(seqs[0], "stop")
    assert [p.num_free for p in pools.pools] == [2, 2]  # its blocks went back to its own group's pool
    assert scheduler.running == [seqs[2], seqs[1]] and scheduler.has_unfinished()
