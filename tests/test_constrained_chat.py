"""Constrained chat output through the whole server, on the real bundled model (which writes Python-shaped text and
never DeepSeek's tags unless a grammar forces it): tool_choice "required" / a named function in both DeepSeek
tool-call formats, and response_format or a forced call after an R1 model's free reasoning. Arguments and content
are checked with `jsonschema`, independently of the grammar engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import openseek.engine.engine as engine_module
from openseek import LLMEngine, StructuredOutputsParams
from openseek.server.app import build_app
from openseek.server.async_engine import AsyncEngine
from openseek.server.tools import NamedToolChoice, Tool, tool_call_grammar

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
testclient = pytest.importorskip("fastapi.testclient")

DATA = Path(__file__).parent / "data"
BUNDLED = Path(__file__).parents[1] / "openseek" / "bundled"
WEATHER = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["location"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
NAMED = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "degrees": {"type": "integer", "minimum": -40, "maximum": 50}},
          "required": ["city", "degrees"], "additionalProperties": False}
# the JSON grammar would refuse its first token
THOUGHT = 'def answer(city):\n    return {"city": city, "deg": None}  # not JSON; then JSON\n'


class Client:
    def __init__(self, template: str, **parsers):
        engine = LLMEngine.from_pretrained(BUNDLED)
        engine.tokenizer.chat_template = (DATA / template).read_text(encoding="utf-8")
        self.tok = engine.tokenizer
        self.http = testclient.TestClient(build_app(AsyncEngine(engine), "ds", **parsers))
        self.openai = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=self.http,
                                    max_retries=0)

    def chat(self, **kw):
        return self.openai.chat.completions.create(model="ds", messages=USER, **{"max_tokens": 400, **kw})

    def both(self, **kw) -> tuple[dict, dict]:
        """The unstreamed message and the streamed one put together as a client does, each with finish_reason."""
        choice = self.chat(**kw).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        full = {"reasoning": getattr(choice.message, "reasoning_content", None) or "",
                "content": choice.message.content or "", "calls": calls, "reason": choice.finish_reason}
        streamed: dict = {"reasoning": "", "content": "", "calls": {}, "reason": None}
        for chunk in self.chat(stream=True, **kw):
            for c in chunk.choices:
                d = c.delta.model_dump(exclude_none=True)
                streamed["reasoning"] += d.get("reasoning_content", "")
                streamed["content"] += d.get("content", "")
                for t in d.get("tool_calls", []):
                    name, args = streamed["calls"].get(t["index"], ("", ""))
                    fn = t.get("function", {})
                    streamed["calls"][t["index"]] = (name + (fn.get("name") or ""), args + (fn.get("arguments") or ""))
                streamed["reason"] = c.finish_reason or streamed["reason"]
        streamed["calls"] = [streamed["calls"][i] for i in sorted(streamed["calls"])]
        return full, streamed


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(BUNDLED)


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v31"])
def tools_client(request):
    # the V3 template renders the prompt for both: the grammar, not the prompt, sets the call format
    client = Client("deepseek_v3.jinja", tool_parser=request.param)
    with client.http:
        yield client


@pytest.fixture(scope="module")
def r1():
    client = Client("deepseek_r1.jinja", reasoning_parser="deepseek_r1", tool_parser="deepseek_v3")
    with client.http:
        yield client


def assert_valid_calls(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls, "no tool call"
    for name, args in calls:
        assert name in names, name
        jsonschema.validate(json.loads(args), SCHEMAS[name])


# ---- tool_choice required / named ------------------------------------------------------------------------------
B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
V3_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"  # DeepSeek-V3's template
V31_CALL = "<｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜>"  # DeepSeek-V3.1's


@pytest.mark.parametrize("parser, call, between", [("deepseek_v3", V3_CALL, "\n"), ("deepseek_v31", V31_CALL, "")])
@pytest.mark.parametrize("choice, calls, accepted", [
    ("required", [("get_time", '{"zone":"UTC"}')], True),
    ("required", [("get_time", '{"zone":"UTC"}'), ("get_weather", '{"location":"Oslo"}')], True),
    ("required", [], False),
    ("required", [("get_date", "{}")], False),  # not in tools
    ("required", [("get_weather", '{"unit":"celsius"}')], False),  # location is required
    ("required", [("get_time", '{"zone": "UTC"}')], False),  # compact JSON only
    (NAMED, [("get_time", '{"zone":"JST"}')], True),
    (NAMED, [("get_weather", '{"location":"Oslo"}')], False),  # not the named one
    (NAMED, [("get_time", '{"zone":"JST"}')] * 2, False),  # one call
])
def test_the_forced_grammar_takes_the_templates_call_format_and_valid_arguments(engine, parser, call, between, choice,
                                                                                 calls, accepted):
    named = NamedToolChoice.model_validate(choice) if isinstance(choice, dict) else choice
    grammar = tool_call_grammar([Tool.model_validate(t) for t in TOOLS], named, parser)
    matcher = engine.compile_grammar(StructuredOutputsParams(grammar=grammar))
    text = B + between.join(call.format(name, args) for name, args in calls) + E
    ok = all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False))
    assert (ok and matcher.is_stopped()) == accepted


def test_a_named_tool_choice_forces_one_valid_call_of_that_tool(tools_client):
    for seed in (0, 1):
        full, streamed = tools_client.both(tools=TOOLS, tool_choice=NAMED, temperature=0.9, seed=seed)
        assert full == streamed
        assert full["reason"] == "tool_calls" and full["content"] == "" and len(full["calls"]) == 1
        assert_valid_calls(full["calls"], {"get_time"})


def test_required_forces_valid_calls_of_the_given_tools(tools_client):
    """One or more calls: the bundled model often keeps calling until max_tokens ("length"), and every call it
    completed validates all the same. Whether a seed finishes depends on the CPU's rounding, so none is required to.
    A first request warms the prefix cache: a cached prompt's tail is computed in another chunk shape, whose
    rounding moves logprobs by ~5e-4, enough to move a seeded draw among many unlikely tokens."""
    tools_client.chat(tools=TOOLS, tool_choice="required", max_tokens=1)
    for seed in range(2):
        full, streamed = tools_client.both(tools=TOOLS, tool_choice="required", temperature=0.9, seed=seed,
                                           max_tokens=160)
        assert full["content"] == "" and full["reason"] == streamed["reason"] in ("tool_calls", "length")
        assert full["calls"] or full["reason"] == "length"
        # a call cut by max_tokens has already been streamed in part, and is left out of the full message
        assert streamed["calls"][:len(full["calls"])] == full["calls"]
        assert full == streamed or full["reason"] == "length"
        assert_valid_calls(full["calls"], set(SCHEMAS))


def test_required_without_parallel_tool_calls_makes_exactly_one_call(tools_client):
    for seed in (0, 1, 2):
        full = tools_client.both(tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                                 parallel_tool_calls=False)[0]
        assert full["reason"] == "tool_calls" and len(full["calls"]) == 1
        assert_valid_calls(full["calls"], set(SCHEMAS))


def test_a_forced_call_cut_by_max_tokens_finishes_with_length(tools_client):
    full, streamed = tools_client.both(tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=30)
    assert full["reason"] == streamed["reason"] == "length"
    assert full["calls"] == [] and full["content"] == ""  # the cut call is not returned; no tag leaks into content


@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "leave out"),
    ({"tool_choice": NAMED, "structured_outputs": {"choice": ["a"]}}, "tool_choice", "leave out"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}]}, "tools",
     "cannot compile"),
])
def test_a_forced_call_that_cannot_be_constrained_is_a_400(tools_client, body, param, words):
    response = tools_client.http.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and words in error["message"], error


# ---- after the reasoning ---------------------------------------------------------------------------------------
@pytest.fixture
def thought(monkeypatch):
    """The model "thinks" a scripted text (its tokens picked after the real, masked draw), then samples as usual."""
    real, script = engine_module.sample, {"ids": []}

    def sample(logits, params, generators, prompt_ids, output_ids, eos_token_id, masks=None):
        result = real(logits, params, generators, prompt_ids, output_ids, eos_token_id, masks)
        for row, out in enumerate(output_ids):
            if len(out) < len(script["ids"]):
                # the grammar's matcher refuses a token its mask forbids, failing the request: free text passes
                result.token_ids[row] = script["ids"][len(out)]
        return result

    monkeypatch.setattr(engine_module, "sample", sample)
    return script


def test_response_format_leaves_the_reasoning_free(r1):
    """Until it writes </think>, the model writes its own Python-shaped text, not the JSON the format asks for."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    choice = r1.chat(temperature=0.8, seed=4, max_tokens=40, response_format=fmt).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    reasoning = choice.message.reasoning_content
    assert reasoning and not reasoning.startswith("{"), reasoning


def test_after_the_reasoning_the_content_follows_response_format(r1, thought):
    thought["ids"] = r1.tok.encode(THOUGHT + "</think>", add_special_tokens=False)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    full, streamed = r1.both(response_format=fmt, temperature=0.9, seed=5)
    assert full == streamed and full["reason"] == "stop"
    assert full["reasoning"] == THOUGHT
    jsonschema.validate(json.loads(full["content"]), ANSWER)


def test_after_the_reasoning_a_required_tool_call_is_forced(r1, thought):
    thought["ids"] = r1.tok.encode("I need a tool.</think>", add_special_tokens=False)
    full, streamed = r1.both(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.9,
                             seed=6)
    assert full == streamed and full["reason"] == "tool_calls" and full["reasoning"] == "I need a tool."
    assert_valid_calls(full["calls"], set(SCHEMAS))
