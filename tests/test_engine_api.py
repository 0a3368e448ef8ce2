"""The engine's public API: EngineConfig, LLMEngine over an already-loaded model, n fan-out, admission, stats."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_folder
from openseek import load_pretrained
from openseek.cli import SERVE_ENGINE_FIELDS, build_parser, engine_config
from openseek.engine import LLM, EngineConfig, LLMEngine, QueueFull, SamplingParams
from openseek.tokenizer import Tokenizer
from openseek.validation import FieldError

PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def folder(model):
    return model[0]


def run(engine: LLMEngine) -> dict:
    """Step until idle; every finished request's RequestOutput by id, and every delta."""
    done, deltas = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out)
            if out.output is not None:
                done[out.request_id] = out.output
    return {"done": done, "deltas": deltas}


def test_engine_over_a_loaded_model_matches_transformers(model):
    folder, ref = model
    engine = LLMEngine(load_pretrained(folder), Tokenizer.from_pretrained(folder), EngineConfig(block_size=4))
    engine.add_request("a", PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    got = run(engine)["done"]["a"].outputs[0].token_ids
    ids = torch.tensor([PROMPT["prompt_token_ids"]])
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert got == want[0, ids.shape[1]:].tolist()


def test_n_fans_out_in_the_engine_with_seed_plus_j(folder):
    engine = LLMEngine.from_pretrained(folder)
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    engine.add_request("fan", PROMPT, params)
    assert engine.stats().waiting == 3
    result = run(engine)
    out = result["done"]["fan"]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert sum(d.output is not None for d in result["deltas"]) == 1  # only the last delta carries the request
    for j, c in enumerate(out.outputs):
        alone = LLM(folder).generate(PROMPT, SamplingParams(temperature=1.0, seed=11 + j, max_tokens=8,
                                                            ignore_eos=True))[0].outputs[0]
        assert (c.token_ids, c.text) == (alone.token_ids, alone.text)
        streamed = [d for d in result["deltas"] if d.index == j]
        assert "".join(d.new_text for d in streamed) == c.text
        assert sum((d.new_token_ids for d in streamed), []) == c.token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_admission_limit_refuses_without_side_effects(folder):
    engine = LLMEngine.from_pretrained(folder, EngineConfig(max_waiting=4))
    engine.add_request("a", PROMPT, SamplingParams(n=3, max_tokens=2))
    with pytest.raises(QueueFull, match="3 of 4"):
        engine.add_request("b", PROMPT, SamplingParams(n=2, max_tokens=2))
    with pytest.raises(FieldError) as e:
        engine.add_requests([("c", PROMPT, SamplingParams(n=3)), ("d", PROMPT, SamplingParams(n=3))])
    assert e.value.field == "n" and "asks for 6" in str(e.value)
    with pytest.raises(ValueError, match="max_model_len"):  # all or none: "e" is not queued either
        engine.add_requests([("e", PROMPT, SamplingParams()), ("f", [5] * 10_000, SamplingParams())])
    assert engine.stats().waiting == 3 and set(engine.requests) == {"a"}
    assert set(run(engine)["done"]) == {"a"}


def test_stats_count_waiting_running_cache_and_generated_tokens(folder):
    engine = LLMEngine.from_pretrained(folder, EngineConfig(block_size=4, max_num_seqs=1))
    assert engine.stats() == type(engine.stats())(0, 0, 0.0, 0)
    for rid in ("a", "b"):
        engine.add_request(rid, PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # one sequence at a time: "a" is prefilled (9 tokens + 1 sampled: 3 blocks of 4)
    s = engine.stats()
    assert (s.waiting, s.running, s.generation_tokens) == (1, 1, 1)
    assert s.cache_usage == pytest.approx(3 / engine.pool.num_blocks)
    run(engine)
    s = engine.stats()
    assert (s.waiting, s.running, s.cache_usage, s.generation_tokens) == (0, 0, 0.0, 6)


def test_update_weights_drops_prefixes_cached_with_the_old_weights(folder):
    engine = LLMEngine.from_pretrained(folder, EngineConfig(block_size=4))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("warm", PROMPT, params)
    run(engine)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.mul_(1.5)  # a trainer's update, in place
    engine.update_weights()
    engine.add_request("after", PROMPT, params)
    after = run(engine)["done"]["after"]
    fresh = LLM(engine.model, tokenizer=engine.tokenizer).generate(PROMPT, params)[0]
    assert after.num_cached_tokens == 0 and after.outputs[0].token_ids == fresh.outputs[0].token_ids


@pytest.mark.parametrize("field, value", [("max_num_seqs", 0), ("block_size", 1.5), ("dtype", "fp64"),
                                          ("max_model_len", -1), ("enable_prefix_caching", 1), ("max_waiting", None)])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(FieldError) as e:
        EngineConfig(**{field: value})
    assert e.value.field == field and str(e.value).startswith(f"config field {field}=")


@pytest.mark.parametrize("max_model_len", [84, 96])
def test_the_default_cache_holds_max_model_len_in_whole_blocks(folder, max_model_len):
    # the default had been max_num_seqs * max_model_len tokens' bytes, which for a length that is not a whole number
    # of blocks held fewer blocks than one full context needs: LLM(max_model_len=84) failed on a field not given
    llm = LLM(folder, max_num_seqs=2, max_model_len=max_model_len, block_size=16)
    blocks = len(llm.llm_engine.runner.kv_cache[0]) // 16
    assert blocks == 2 * -(-max_model_len // 16)  # two full contexts, each its whole blocks
    out = llm.generate({"prompt_token_ids": [5] * (max_model_len - 8)},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_a_cache_too_large_to_allocate_is_a_config_error(folder):
    with pytest.raises(FieldError) as e:
        LLM(folder, kv_cache_memory=10**30)
    assert e.value.field == "kv_cache_memory" and "could not be allocated" in str(e.value)


@pytest.mark.parametrize("max_position_embeddings, max_model_len", [(0, None), (4096, 1)])
def test_a_context_with_no_room_to_generate_is_a_config_error(folder, monkeypatch, max_position_embeddings,
                                                               max_model_len):
    # max_position_embeddings 0 built an engine of 0 blocks (stats() divided by zero); max_model_len 1 one that
    # refused every prompt
    model = load_pretrained(folder)
    monkeypatch.setattr(model.config, "max_position_embeddings", max_position_embeddings)
    with pytest.raises(FieldError) as e:
        LLMEngine(model, None, EngineConfig(max_model_len=max_model_len))
    assert e.value.field == "max_model_len" and "at least 2" in str(e.value)


def test_llm_keywords_and_cli_flags_are_engine_config_fields(folder):
    llm = LLM(folder, config=EngineConfig(block_size=8), max_num_seqs=3)
    assert (llm.llm_engine.config.block_size, llm.llm_engine.config.max_num_seqs) == (8, 3)
    with pytest.raises(TypeError):
        LLM(folder, max_num_sequences=3)
    args = build_parser().parse_args(["serve", "--block-size", "8", "--no-enable-prefix-caching", "--dtype", "bf16"])
    assert engine_config(args, SERVE_ENGINE_FIELDS) == EngineConfig(block_size=8, enable_prefix_caching=False,
                                                                      dtype=torch.bfloat16)
    assert set(SERVE_ENGINE_FIELDS) == set(EngineConfig.__dataclass_fields__)


def test_generate_feeds_more_prompts_than_the_waiting_queue_holds(folder):
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(5)]
    params = SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True)
    small = LLM(folder, max_waiting=2).generate(prompts, params)  # one prompt's two sequences at a time
    roomy = LLM(folder).generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in small] == [[c.token_ids for c in o.outputs] for o in roomy]
    assert [o.prompt_token_ids for o in small] == [p["prompt_token_ids"] for p in prompts]
