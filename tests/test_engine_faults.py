"""Faults stay with their request: a failing row, forward pass or output step never fails the others or the engine."""

from __future__ import annotations

import logging

import pytest

import openseek.engine.engine as engine_module
from conftest import build_tiny_folder
from openseek import load_pretrained
from openseek.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from openseek.tokenizer import Tokenizer

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [20, 21, 22], "c": [30, 31, 32, 33, 34, 35, 36, 37, 38]}
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True)
BAD_SEED = 666  # marks the request a patched sampler refuses


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = build_tiny_folder(tmp_path_factory.mktemp("faults") / "tiny")[0]
    return load_pretrained(folder), Tokenizer.from_pretrained(folder)


def new_engine(loaded, **fields) -> LLMEngine:
    model, tokenizer = loaded
    config = EngineConfig(block_size=4, max_model_len=64, kv_cache_memory=64 * 4 * token_bytes(model), **fields)
    return LLMEngine(model, tokenizer, config)


def token_bytes(model) -> int:
    return model.config.num_hidden_layers * model.config.kv_cache_dim * model.dtype.itemsize


def run(engine: LLMEngine) -> tuple[dict, list]:
    """Step until idle: every finished request's RequestOutput by id, and every delta."""
    done, deltas = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out)
            if out.output is not None:
                done[out.request_id] = out.output
    return done, deltas


def alone(loaded, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = new_engine(loaded)
    engine.add_request("x", {"prompt_token_ids": prompt}, params)
    return run(engine)[0]["x"].outputs[0].token_ids


def idle_and_whole(engine: LLMEngine) -> bool:
    """Nothing scheduled or held: every block free (cached ones included, as the pool counts them)."""
    pool = engine.pool
    return (not engine.has_unfinished_requests() and not engine.requests and pool.num_free == pool.num_blocks
            and not any(pool.ref_count) and engine.stats().cache_usage == 0.0)


def add(engine: LLMEngine, params: dict[str, SamplingParams]) -> None:
    for rid, p in params.items():
        engine.add_request(rid, {"prompt_token_ids": PROMPTS[rid]}, p)


def assert_errored(out, what: str, n: int = 1) -> None:
    assert out.finished and out.error is not None and what in out.error
    assert [c.finish_reason for c in out.outputs] == ["error"] * n


def refusing_sample(monkeypatch) -> None:
    """The engine's sampler raises for any batch that holds the BAD_SEED request (and for that row alone)."""
    real = engine_module.sample

    def sample(logits, params, *args):
        if any(p.seed is not None and BAD_SEED <= p.seed < BAD_SEED + 10 for p in params):
            raise RuntimeError("sampler exploded")
        return real(logits, params, *args)
    monkeypatch.setattr(engine_module, "sample", sample)


def test_a_row_whose_sampling_raises_fails_only_its_request(loaded, monkeypatch, caplog):
    refusing_sample(monkeypatch)
    engine = new_engine(loaded)
    bad = SamplingParams(n=2, temperature=0.5, seed=BAD_SEED, max_tokens=6, ignore_eos=True)
    add(engine, {"a": GREEDY, "b": bad, "c": SEEDED})
    with caplog.at_level(logging.ERROR, logger=engine_module.__name__):
        done, deltas = run(engine)
    assert_errored(done["b"], "sampler exploded", n=2)
    assert [d.error for d in deltas if d.request_id == "b"] == [done["b"].error] * 2  # each completion's last delta
    assert done["a"].error is None and done["a"].outputs[0].finish_reason == "length"
    assert done["a"].outputs[0].token_ids == alone(loaded, PROMPTS["a"], GREEDY)
    assert done["c"].outputs[0].token_ids == alone(loaded, PROMPTS["c"], SEEDED)  # same draws as alone
    assert "sampler exploded" in caplog.text
    assert idle_and_whole(engine)


def test_nan_logits_fail_only_their_request(loaded, monkeypatch):
    # a request whose logits went NaN (a tiny temperature did this through the sampler) used to fail the batch
    engine = new_engine(loaded)
    real = engine.runner.run

    def run_with_nan(batch):
        out = real(batch)
        rows = [seq.request_id for seq, s in zip(batch.seqs, batch.samples) if s]
        if "b" in rows:
            out.sample_logits = out.sample_logits.clone()  # an inference tensor: not writable in place
            out.sample_logits[rows.index("b")] = float("nan")
        return out
    monkeypatch.setattr(engine.runner, "run", run_with_nan)
    add(engine, {"a": SEEDED, "b": SEEDED, "c": GREEDY})
    done, _ = run(engine)
    assert_errored(done["b"], "no finite")
    assert done["a"].outputs[0].token_ids == alone(loaded, PROMPTS["a"], SEEDED)
    assert done["c"].outputs[0].token_ids == alone(loaded, PROMPTS["c"], GREEDY)
    assert idle_and_whole(engine)


def test_a_failed_forward_pass_fails_its_batch_and_the_engine_goes_on(loaded, monkeypatch, caplog):
    engine = new_engine(loaded, max_num_seqs=2)  # "c" waits outside the failing batch
    real, calls = engine.runner.run, []

    def run_once_broken(batch):
        calls.append(sorted(seq.request_id for seq in batch.seqs))
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return real(batch)
    monkeypatch.setattr(engine.runner, "run", run_once_broken)
    add(engine, {"a": GREEDY, "b": SEEDED, "c": GREEDY})
    with caplog.at_level(logging.ERROR, logger=engine_module.__name__):
        first = engine.step()
    assert calls == [["a", "b"]] and "device fell over" in caplog.text
    assert sorted(o.request_id for o in first) == ["a", "b"] and all(o.finish_reason == "error" for o in first)
    for o in first:
        assert_errored(o.output, "forward pass")
    done, _ = run(engine)
    assert set(done) == {"c"} and done["c"].outputs[0].token_ids == alone(loaded, PROMPTS["c"], GREEDY)
    assert idle_and_whole(engine)
    add(engine, {"a": GREEDY, "b": SEEDED})  # the same requests again, now served
    done, _ = run(engine)
    assert done["a"].outputs[0].token_ids == alone(loaded, PROMPTS["a"], GREEDY)
    assert done["b"].outputs[0].token_ids == alone(loaded, PROMPTS["b"], SEEDED)
    assert idle_and_whole(engine)


def test_output_processing_and_prompt_logprobs_failures_stay_with_their_request(loaded):
    engine = new_engine(loaded)
    add(engine, {"a": GREEDY, "b": GREEDY, "c": SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)})

    def broken(*args):
        raise UnicodeError("detokenizer choked")
    engine.requests["b"].state.append = broken
    engine.requests["c"].state.record_prompt_logprobs = broken
    done, _ = run(engine)
    assert_errored(done["b"], "detokenizer choked")
    assert_errored(done["c"], "prompt logprobs")
    assert done["a"].outputs[0].token_ids == alone(loaded, PROMPTS["a"], GREEDY)
    assert idle_and_whole(engine)


def test_llm_generate_returns_the_errored_request_and_keeps_working(loaded, monkeypatch):
    refusing_sample(monkeypatch)
    model, tokenizer = loaded
    llm = LLM(model, tokenizer=tokenizer, block_size=4)
    prompts = [{"prompt_token_ids": PROMPTS[k]} for k in "abc"]
    fresh = [o.outputs[0].token_ids for o in LLM(model, tokenizer=tokenizer, block_size=4).generate(prompts, GREEDY)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.5, seed=BAD_SEED, max_tokens=6))
    for o in outs:  # every request of the call carries the bad seed: each fails alone, none raises
        assert_errored(o, "sampler exploded")
    assert idle_and_whole(llm.llm_engine)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == fresh
    assert idle_and_whole(llm.llm_engine)


def test_a_tiny_temperature_beside_other_requests_is_greedy(loaded):
    # temperature=1e-46 is 0 in float32: it made NaN weights and the step raised for every request in flight
    engine = new_engine(loaded)
    add(engine, {"a": SEEDED, "b": SamplingParams(temperature=1e-46, max_tokens=6, ignore_eos=True), "c": GREEDY})
    done, _ = run(engine)
    assert done["b"].outputs[0].token_ids == alone(loaded, PROMPTS["b"], GREEDY)
    assert done["a"].outputs[0].token_ids == alone(loaded, PROMPTS["a"], SEEDED)
    assert all(o.error is None for o in done.values()) and idle_and_whole(engine)
