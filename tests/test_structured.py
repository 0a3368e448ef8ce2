"""Structured output and logit_bias with the bundled model, which writes Python-shaped text when unconstrained: every
finished output must parse and validate (checked with the `jsonschema` library, independent of the grammar engine),
offline through LLM and through `openseek serve` with the official openai client."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import torch

from openseek import BUNDLED_MODEL, LLM, SamplingParams, StructuredOutputsParams
from server_util import Server
from openseek.validation import FieldError

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

NAME = {"type": "string", "maxLength": 12}  # the bundled model's strings run on: bounded, outputs stay short
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": NAME, "id": {"type": "integer", "minimum": 0,
                                                                                       "maximum": 9999}}, "required": ["name", "id"],
                 "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "array+enum": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "kind": {"enum": ["a", "b", 3, None]}}, "required": ["tags", "kind"], "additionalProperties": False},
    "bounds": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}}, "required": ["score", "count"],
        "additionalProperties": False},
    "pattern": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "note": {"anyOf": [NAME, {"type": "null"}]}}, "required": ["sku", "note"], "additionalProperties": False},
    "array-of-objects": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                    "y": {"type": "integer"}},
                                                    "required": ["x", "y"], "additionalProperties": False},
                         "maxItems": 3},
}


def constrained(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 150, "temperature": 0.8, "seed": 0, **kw},
                          structured_outputs=StructuredOutputsParams(json=schema))


@pytest.fixture(scope="module")
def llm():
    return LLM(BUNDLED_MODEL, dtype=torch.float32, max_num_seqs=16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(None, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


# ---- offline -----------------------------------------------------------------------------------------------------
def test_every_finished_output_parses_and_validates(llm):
    reasons = []
    for name, schema in SCHEMAS.items():
        out = llm.generate(["def parse(text):", "User: give me JSON\n\nAssistant:"], constrained(schema, n=2))
        for c in (c for o in out for c in o.outputs):
            reasons.append(c.finish_reason)
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
            else:  # a number's digits may run past max_tokens: JSON bounds a value, not its length
                assert c.finish_reason == "length" and len(c.token_ids) == 150, (name, c.text)
    assert reasons.count("stop") >= 0.75 * len(reasons), reasons


def test_regex_choice_and_lark_grammar(llm):
    cases = [(dict(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
             (dict(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
             (dict(grammar='start: "f(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'),
              lambda t: re.fullmatch(r"f\([0-9]{1,3}(,[0-9]{1,3})*\)", t))]
    for spec, ok in cases:
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=1, n=3,
                                structured_outputs=StructuredOutputsParams(**spec))
        for c in llm.generate("x = ", params)[0].outputs:
            assert c.finish_reason == "stop" and ok(c.text), (spec, c.text)


@pytest.mark.parametrize("spec, text, accepted", [
    (dict(json=SCHEMAS["bounds"]), 'Let me think.\n</think>{"score":1.5,"count":3}', True),
    (dict(json=SCHEMAS["bounds"]), '</think>{"score":3,"count":3}', False),  # score above its maximum
    (dict(json=SCHEMAS["bounds"]), '{"score":1.5,"count":3}', False),  # the reasoning must end first
    (dict(choice=["yes", "no"]), "hmm </think> no", False), (dict(choice=["yes", "no"]), "hmm </think>no", True),
    (dict(grammar='start: "call(" %json {"type": "array", "items": {"type": "integer"}} ")"'), "</think>call([1,2])",
     True),
])
def test_reasoning_end_leaves_the_reasoning_free_then_applies_the_constraint(llm, spec, text, accepted):
    engine = llm.llm_engine
    matcher = engine.compile_grammar(StructuredOutputsParams(**spec, reasoning_end="</think>"))
    ok = all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False))
    assert (ok and matcher.is_accepting()) == accepted


TAG = {"structures": [{"begin": "<call=add>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                          "required": ["x"], "additionalProperties": False},
                        "end": "</call>"}], "triggers": ["<call="]}


@pytest.mark.parametrize("text, accepted", [('Sure. <call=add>{"x":2}</call> done', True),
                                            ("no call at all", True), ('<call=add>{"y":2}</call>', False),
                                            ('<call=sub>{"x":2}</call>', False)])
def test_structural_tag_constrains_only_what_follows_a_trigger(llm, text, accepted):
    engine = llm.llm_engine
    matcher = engine.compile_grammar(StructuredOutputsParams(structural_tag=TAG))
    ok = all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False))
    assert (ok and matcher.is_accepting()) == accepted


def test_eos_is_allowed_only_where_the_grammar_may_end(llm):
    from openseek.engine.structured import token_masks

    engine = llm.llm_engine
    eos, V = engine.eos_token_id, engine.model.config.vocab_size
    matcher = engine.compile_grammar(StructuredOutputsParams(regex="[0-9]{2,3}"))
    steps = []
    for t in engine.tokenizer.encode("1", add_special_tokens=False) + engine.tokenizer.encode("2",
                                                                                          add_special_tokens=False):
        steps.append(token_masks([matcher], V)[0, eos].item())
        assert matcher.consume_token(t)
    steps.append(token_masks([matcher], V)[0, eos].item())  # "12": two digits, a possible end
    assert steps == [False, False, True]
    # a +100 bias on EOS cannot end an output early: the mask comes first, so it ends as soon as it may
    for spec in (dict(regex="[0-9]{2,5}"), dict(json=SCHEMAS["bounds"])):
        c = llm.generate("x", SamplingParams(max_tokens=40, temperature=0, logit_bias={eos: 100.0},
                                             structured_outputs=StructuredOutputsParams(**spec)))[0].outputs[0]
        assert c.finish_reason == "stop" and eos not in c.token_ids[:-1]
        if "regex" in spec:  # two digits take at most two tokens, then EOS
            assert re.fullmatch("[0-9]{2,5}", c.text) and len(c.token_ids) <= 3 and c.token_ids[-1] == eos
        else:  # a JSON object ends the grammar at its "}", before any EOS
            jsonschema.validate(json.loads(c.text), SCHEMAS["bounds"])


def test_max_tokens_cut_is_length(llm):
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 40}}, "required": ["text"]}
    c = llm.generate("def", constrained(schema, max_tokens=5))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and c.text.startswith('{"text":"')


def test_grammar_ends_the_output_even_with_ignore_eos(llm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
    c = llm.generate("def", params)[0].outputs[0]
    assert c.text in ("alpha", "beta") and c.finish_reason == "stop" and len(c.token_ids) < 30


def test_unconstrained_request_is_unchanged_by_a_constrained_one_in_its_batch(llm):
    plain = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    alone = llm.generate("def area(r):", plain)[0].outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("constrained", "class Point:", constrained(SCHEMAS["nested"]))
    engine.add_request("plain", "def area(r):", plain)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.output) for o in engine.step() if o.output is not None)
    assert done["plain"].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(done["constrained"].outputs[0].text), SCHEMAS["nested"])


def test_uncompilable_grammar_is_refused_before_the_engine_takes_the_request(llm):
    bad = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string",
                                                                              "pattern": "(unclosed"}}})
    with pytest.raises(ValueError, match=r"structured_outputs\.json=.*cannot compile"):
        llm.llm_engine.add_request("bad", "x", SamplingParams(structured_outputs=bad))
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="^min_tokens=2 is invalid"):  # a finished grammar leaves only EOS
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a"))


def test_logit_bias_ids_outside_the_vocabulary_are_refused(llm):
    with pytest.raises(ValueError, match=r"^logit_bias=\[4096\] is invalid"):
        llm.generate("x", SamplingParams(logit_bias={4096: 1.0}))


# ---- server ------------------------------------------------------------------------------------------------------
class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    qty: int = pydantic.Field(ge=1, le=99)
    colour: str = pydantic.Field(pattern="^(red|green|blue)$")


class Order(pydantic.BaseModel):
    items: list[Item] = pydantic.Field(min_length=1, max_length=3)
    express: bool


def test_parse_with_a_pydantic_model(server):
    client = server.client()
    r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "An order, as JSON"}],
                                      response_format=Order, max_completion_tokens=200, temperature=0.7, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Order)
    jsonschema.validate(json.loads(choice.message.content), Order.model_json_schema())


@pytest.mark.parametrize("name", ["nested", "pattern"])
def test_streamed_equals_non_streamed_for_the_same_seed(server, name):
    client, schema = server.client(), SCHEMAS[name]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=150, temperature=0.9,
              seed=11, n=2, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                                    "strict": True}})
    # warm the prefix cache first: a cached prompt's tail is computed in another chunk shape, whose rounding can
    # move a seeded draw among unlikely tokens (tests/test_constrained_chat.py has the figures)
    client.chat.completions.create(**{**kw, "max_tokens": 1, "n": 1})
    full = client.chat.completions.create(**kw)
    texts, reasons = ["", ""], [None, None]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == [c.message.content for c in full.choices]
    assert reasons == [c.finish_reason for c in full.choices] and "stop" in reasons
    for t, reason in zip(texts, reasons):
        if reason == "stop":
            jsonschema.validate(json.loads(t), schema)


def test_completions_endpoint_takes_response_format_and_structured_outputs(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt="def f():", max_tokens=120, temperature=0.8, seed=2,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":  # any object: free-form strings may run past max_tokens
        assert isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=10,
                                  extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right") and r.choices[0].finish_reason == "stop"


def test_logit_bias_forces_a_token_and_logprobs_show_it(server):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logit_bias={"65": 100}, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == "bbb" == "".join(c.token for c in content)  # token 65 is "b"
    assert all(c.logprob > -1e-3 and c.top_logprobs[1].logprob < -50 for c in content)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"--5": 1}}, "logit_bias"), ({"logit_bias": {"4096": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_grammar_or_bias_is_a_400_naming_its_field(server, body, param):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       extra_body=body)
    assert e.value.response.json()["error"]["param"] == param
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")  # nothing in the engine was disturbed


# ---- the sweep (pytest -m slow) ----------------------------------------------------------------------------------
def sweep_schemas(n: int = 50) -> list[dict]:
    """n JSON schemas of varied shape, built deterministically: objects nested up to three deep, arrays, enums,
    optional and required fields, bounded numbers, strings with patterns and lengths."""
    leaves = [NAME, {"type": "integer", "minimum": -50, "maximum": 50}, {"type": "number", "minimum": 0, "maximum": 1},
              {"type": "boolean"}, {"enum": ["north", "south", "east", "west"]}, {"type": "null"},
              {"type": "string", "pattern": "^[a-f0-9]{4}$"}, {"type": "integer", "exclusiveMinimum": 10,
                                                               "exclusiveMaximum": 20},
              {"type": "string", "format": "date"}, {"anyOf": [{"type": "integer"}, NAME]}]

    def node(seed: int, depth: int) -> dict:
        kind = seed % 5 if depth < 3 else 4
        if kind in (0, 1):  # an object
            keys = [string.ascii_lowercase[(seed + k) % 26] + str(k) for k in range(1 + seed % 4)]
            props = {k: node(seed * 7 + 3 * i + 1, depth + 1) for i, k in enumerate(keys)}
            return {"type": "object", "properties": props, "required": keys[: 1 + seed % len(keys)],
                    "additionalProperties": False}
        if kind == 2:  # an array
            return {"type": "array", "items": node(seed * 5 + 2, depth + 1), "minItems": seed % 2, "maxItems": 3}
        return leaves[seed % len(leaves)]

    return [{"type": "object", "properties": {"root": node(i, 1), "id": leaves[i % len(leaves)]},
             "required": ["root", "id"], "additionalProperties": False} for i in range(n)]


@pytest.mark.slow
def test_fifty_schemas_all_finished_outputs_validate_and_stream_alike(server):
    client, finished, valid = server.client(), 0, 0
    for i, schema in enumerate(sweep_schemas()):
        kw = dict(model="tiny", messages=[{"role": "user", "content": f"Record {i} as JSON"}], max_tokens=300,
                  temperature=0.8, seed=i, response_format={"type": "json_schema", "json_schema": {
                      "name": f"s{i}", "schema": schema, "strict": True}})
        c = client.chat.completions.create(**kw).choices[0]
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
                           if ch.choices)
        assert streamed == c.message.content, i
        if c.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(c.message.content), schema, format_checker=jsonschema.FormatChecker())
            valid += 1
    print(f"{valid}/{finished} finished outputs valid; {finished}/50 finished within max_tokens")
    assert finished >= 45 and valid == finished


def test_a_schema_nested_past_the_recursion_limit_is_a_field_error(llm):
    schema = {"type": "string"}
    for _ in range(3000):  # deeper than json.dumps can walk
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    with pytest.raises(FieldError, match="structured_outputs.json.*nested too deeply"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)))
