"""LLM end to end on a tiny random checkpoint with a tokenizer, against transformers and against itself."""

from __future__ import annotations

import pytest
import torch

from conftest import build_reference, build_tiny_folder, first_new_substring, save_reference
from openseek import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("engine") / "tiny")[0]


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def pool_whole(engine) -> bool:
    return engine.pool.num_free == engine.pool.num_blocks and all(c == 0 for c in engine.pool.ref_count)


def prompts(n=8, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist()} for i in range(n)]


def test_batched_greedy_matches_single_and_transformers(folder, reference):
    llm = LLM(folder, block_size=4)
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY)]
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts()]
    assert batch == alone
    for p, got in zip(prompts(), batch):
        ids = torch.tensor([p["prompt_token_ids"]])
        with torch.no_grad():
            # an explicit mask: generate would otherwise treat prompt tokens equal to pad_token_id as padding
            want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
        assert got == want[0, ids.shape[1]:].tolist()
    assert pool_whole(llm.llm_engine)


@pytest.mark.parametrize("kwargs", [dict(max_num_batched_tokens=7), dict(enable_prefix_caching=False),
                                    dict(max_num_seqs=2)])
def test_chunked_prefill_prefix_hits_and_small_batches_change_nothing(folder, kwargs):
    shared = prompts(1, seed=5)[0]["prompt_token_ids"] * 3
    ps = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts(4)]
    base = LLM(folder, block_size=4)
    first = [o.outputs[0].token_ids for o in base.generate(ps, GREEDY)]
    again = base.generate(ps, GREEDY)  # every prompt now starts with cached blocks
    assert all(o.num_cached_tokens >= 4 * (len(shared) // 4) for o in again)
    assert [o.outputs[0].token_ids for o in again] == first
    other = LLM(folder, block_size=4, **kwargs)
    assert [o.outputs[0].token_ids for o in other.generate(ps, GREEDY)] == first


def test_reset_prefix_cache_forgets_prefixes_and_keeps_the_pool_whole(folder):
    llm = LLM(folder, block_size=4)
    engine = llm.llm_engine
    p = {"prompt_token_ids": prompts(1, seed=7)[0]["prompt_token_ids"] * 4}  # full blocks to cache
    first = llm.generate(p, GREEDY)[0]
    assert llm.generate(p, GREEDY)[0].num_cached_tokens > 0
    engine.add_request("running", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # a sequence holds blocks while the cache is reset
    llm.reset_prefix_cache()
    again = llm.generate(p, GREEDY)[0]  # runs alongside "running", which finishes too
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    while engine.has_unfinished_requests():
        engine.step()
    assert pool_whole(engine)
    assert llm.generate(p, GREEDY)[0].num_cached_tokens > 0  # prefixes are cached again afterwards


def test_preemption_recomputes_and_frees_every_block(folder):
    # 12 blocks of 4 = 48 tokens for 6 sequences of up to ~35 tokens each: preemption is certain
    llm = LLM(folder, block_size=4, max_model_len=48, kv_cache_memory=12 * 4 * llm_bytes(folder))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts(6), params)]
    roomy = LLM(folder, block_size=4)
    assert got == [o.outputs[0].token_ids for o in roomy.generate(prompts(6), params)]
    assert pool_whole(llm.llm_engine)


def llm_bytes(folder) -> int:
    import openseek
    cfg = openseek.ModelConfig.from_file(folder)
    return cfg.num_hidden_layers * cfg.kv_cache_dim * 4


def test_abort_frees_blocks(folder):
    llm = LLM(folder, block_size=4)
    engine = llm.llm_engine
    for i, p in enumerate(prompts(4)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    for i in range(4):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished_requests()
    assert pool_whole(engine)


def test_step_deltas_concatenate_to_the_final_text(folder):
    llm = LLM(folder)
    engine = llm.llm_engine
    engine.add_request("a", "Hello world", SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True))
    text, tokens = "", []
    while engine.has_unfinished_requests():
        for d in engine.step():
            text += d.new_text
            tokens += d.new_token_ids
            final = d
    assert final.finished and final.finish_reason == "length" and len(tokens) == 20
    assert text == llm.tokenizer.decode(tokens)


def test_seeded_sampling_reproduces_whatever_the_batch(folder):
    llm = LLM(folder)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("The quick brown fox", p)[0].outputs[0].token_ids
    crowd = ["User: Hello", "def forward(self, x):", "The quick brown fox", "你好"]
    mixed = llm.generate(crowd, SamplingParams(temperature=1.0, seed=None, max_tokens=16, ignore_eos=True))
    mixed = llm.generate(crowd[:2] + ["The quick brown fox"], p)
    assert mixed[2].outputs[0].token_ids == alone
    unseeded = [llm.generate("The quick brown fox", SamplingParams(temperature=1.0, max_tokens=16,
                                                                     ignore_eos=True))[0].outputs[0].token_ids
                for _ in range(3)]
    assert len({tuple(u) for u in unseeded}) > 1  # without a seed, draws differ


def test_stop_string_is_trimmed(folder):
    llm = LLM(folder)
    params = SamplingParams(temperature=0.7, seed=0, max_tokens=40, ignore_eos=True)
    for prompt in ["The quick", "Hello world", "def forward", "User: Hello", "Numbers 0123"]:
        free = llm.generate(prompt, params)[0].outputs[0]
        if (k := first_new_substring(free.text)) is not None:
            break
    assert k is not None, "the random model produced no usable stop string"
    stop = free.text[k:k + 2]
    o = llm.generate(prompt, SamplingParams(temperature=0.7, seed=0, max_tokens=40, ignore_eos=True,
                                            stop=[stop, "never-generated"]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.text == free.text[:k]


def test_stop_token_ids_and_eos(folder):
    llm = LLM(folder)
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    target = free.token_ids[4]
    o = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[target]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.token_ids == free.token_ids[: free.token_ids.index(target) + 1]


def test_logprobs_are_returned(folder, reference):
    llm = LLM(folder)
    p = {"prompt_token_ids": [5, 6, 7, 8]}
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0].outputs[0]
    with torch.no_grad():
        want = reference(torch.tensor([p["prompt_token_ids"]])).logits[0, -1].log_softmax(-1)
    lp = o.logprobs[0]
    assert len(lp) == 3 and o.token_ids[0] in lp
    for tok, v in lp.items():
        assert v == pytest.approx(want[tok].item(), abs=1e-4)
    assert set(lp) == set(want.topk(3).indices.tolist())


def test_cache_bytes_are_capacity_times_latent_bytes(folder):
    llm = LLM(folder, kv_cache_memory=1_000_000, block_size=8, max_model_len=1024)
    engine = llm.llm_engine
    cfg = engine.model.config
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert engine.runner.cache_bytes == engine.token_capacity * per_token
    assert engine.token_capacity == (1_000_000 // (8 * per_token)) * 8


def test_bad_requests_are_rejected_and_nothing_accepted_is_lost(folder):
    llm = LLM(folder, max_model_len=64)
    engine = llm.llm_engine
    engine.add_request("keep", "Hello", SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="max_model_len is 64"):
        engine.add_request("long", {"prompt_token_ids": [5] * 64}, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", {"prompt_token_ids": [10**6]})
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", {"prompt_token_ids": []})
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("keep", "again")
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate(["fine", {"prompt_token_ids": [5] * 80}])
    while engine.has_unfinished_requests():
        engine.step()
    assert "keep" not in engine.requests and pool_whole(engine)


def test_model_without_tokenizer_accepts_token_ids(tmp_path):
    path = save_reference(build_reference("v2"), tmp_path / "bare")
    llm = LLM(path)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text prompt")


def test_cli_generate_streams_the_same_text(folder):
    import subprocess
    import sys
    llm = LLM(folder)
    want = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    run = subprocess.run([sys.executable, "-m", "openseek", "generate", "--model", str(folder), "--max-tokens", "8",
                          "Hello"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == want.text + "\n"
    bad = subprocess.run([sys.executable, "-m", "openseek", "generate", "--model", str(folder), "--temperature", "-1",
                          "Hello"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "temperature=-1.0 is invalid" in bad.stderr


def test_prompt_logprobs_match_transformers_and_skip_the_prefix_cache(folder, reference):
    llm = LLM(folder, block_size=4, max_num_batched_tokens=5)  # chunked prefill across the prompt
    ids = prompts(1, seed=9)[0]["prompt_token_ids"] * 4
    llm.generate({"prompt_token_ids": ids}, GREEDY)  # warm the prefix cache
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert entry[ids[p]] == pytest.approx(want[p - 1, ids[p]].item(), abs=1e-4)
        assert set(want[p - 1].topk(2).indices.tolist()) <= set(entry)
    assert pool_whole(llm.llm_engine)
