"""Tool calls and reasoning through the whole server: the official `openai` client, the FastAPI app, the real engine
on the bundled model, DeepSeek's real chat templates (tests/data). The bundled model never writes DeepSeek's tags,
so the engine's sampler is made to pick a scripted text's tokens (then EOS); everything after it runs as in
production: detokenizing, the parsers, SSE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import openseek.engine.engine as engine_module
from openseek import LLMEngine
from openseek.server.app import build_app
from openseek.server.async_engine import AsyncEngine

openai = pytest.importorskip("openai")
testclient = pytest.importorskip("fastapi.testclient")

DATA = Path(__file__).parent / "data"
BUNDLED = Path(__file__).parents[1] / "openseek" / "bundled"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ARGS = '{"location": "Paris", "unit": "celsius"}'
CALL_TEXT = f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{ARGS}\n```{CALL_END}{CALLS_END}"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCRIPT = {"text": ""}  # what the model "writes" in the current test


@pytest.fixture(scope="module", autouse=True)
def scripted_sampler():
    """The engine picks SCRIPT's tokens one by one, then EOS; sampling itself still runs."""
    real = engine_module.sample
    cache: dict[str, list[int]] = {}

    def sample(logits, params, generators, prompt_ids, output_ids, eos_token_id, masks=None):
        result = real(logits, params, generators, prompt_ids, output_ids, eos_token_id, masks)
        ids = cache[SCRIPT["text"]]
        result.token_ids = [ids[len(out)] if len(out) < len(ids) else eos_token_id for out in output_ids]
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "sample", sample)
        yield cache


def serve(template: str, **parsers):
    engine = LLMEngine.from_pretrained(BUNDLED)
    engine.tokenizer.chat_template = (DATA / template).read_text(encoding="utf-8")
    app = build_app(AsyncEngine(engine), "ds", **parsers)
    return engine.tokenizer, testclient.TestClient(app)


@pytest.fixture(scope="module")
def v3(scripted_sampler):
    tok, http = serve("deepseek_v3.jinja", tool_parser="deepseek_v3")
    with http:
        yield Client(tok, http, scripted_sampler)


@pytest.fixture(scope="module")
def r1(scripted_sampler):
    tok, http = serve("deepseek_r1.jinja", reasoning_parser="deepseek_r1", tool_parser="deepseek_v3")
    with http:
        yield Client(tok, http, scripted_sampler)


class Client:
    def __init__(self, tok, http, cache):
        self.tok, self.http, self.cache = tok, http, cache
        self.openai = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)

    def script(self, text: str) -> None:
        SCRIPT["text"] = text
        self.cache[text] = self.tok.encode(text, add_special_tokens=False)
        assert self.tok.decode(self.cache[text]) == text

    def chat(self, **kw):
        return self.openai.chat.completions.create(model="ds", temperature=0, **kw)

    def stream(self, **kw) -> tuple[dict, str | None]:
        """The streamed message put together as a client does, and the finish_reason."""
        message: dict = {"content": "", "reasoning_content": "", "tool_calls": {}}
        reason = None
        for chunk in self.chat(stream=True, **kw):
            for choice in chunk.choices:
                d = choice.delta.model_dump(exclude_none=True)
                message["content"] += d.get("content", "")
                message["reasoning_content"] += d.get("reasoning_content", "")
                for t in d.get("tool_calls", []):
                    call = message["tool_calls"].setdefault(t["index"], {"id": t.get("id"), "name": "", "args": ""})
                    call["name"] += t.get("function", {}).get("name") or ""
                    call["args"] += t.get("function", {}).get("arguments") or ""
                reason = choice.finish_reason or reason
        return message, reason


# ---- tool calls ------------------------------------------------------------------------------------------------
def test_a_tool_call_comes_back_as_tool_calls_with_json_arguments(v3):
    v3.script(CALL_TEXT)
    choice = v3.chat(messages=USER, tools=[WEATHER_TOOL]).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris", "unit": "celsius"}


def test_streamed_tool_call_deltas_add_up_to_the_unstreamed_call(v3):
    v3.script(CALL_TEXT)
    message, reason = v3.stream(messages=USER, tools=[WEATHER_TOOL], tool_choice="auto")
    assert reason == "tool_calls" and message["content"] == "Let me check." and message["reasoning_content"] == ""
    (call,) = message["tool_calls"].values()
    assert call["id"].startswith("call_") and call["name"] == "get_weather" and call["args"] == ARGS


def test_each_of_n_choices_is_parsed_on_its_own(v3):
    v3.script(CALL_TEXT)
    choices = v3.chat(messages=USER, tools=[WEATHER_TOOL], n=2).choices
    assert [(c.index, c.finish_reason, c.message.tool_calls[0].function.arguments) for c in choices] == [
        (0, "tool_calls", ARGS), (1, "tool_calls", ARGS)]
    assert choices[0].message.tool_calls[0].id != choices[1].message.tool_calls[0].id
    calls: dict[int, str] = {}
    for chunk in v3.chat(messages=USER, tools=[WEATHER_TOOL], n=2, stream=True):
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                assert t.index == 0  # tool-call indexes count within a choice
                calls[c.index] = calls.get(c.index, "") + (t.function.arguments or "")
    assert calls == {0: ARGS, 1: ARGS}


def test_a_call_cut_by_max_tokens_finishes_with_length_and_no_tool_calls(v3):
    v3.script(CALL_TEXT)
    cut = len(v3.tok.encode(CALL_TEXT[:CALL_TEXT.index('"Paris"')], add_special_tokens=False)) + 1
    choice = v3.chat(messages=USER, tools=[WEATHER_TOOL], max_tokens=cut).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content == "Let me check."
    message, reason = v3.stream(messages=USER, tools=[WEATHER_TOOL], max_tokens=cut)
    assert reason == "length" and message["tool_calls"][0]["name"] == "get_weather"  # streamed as it came


def test_tool_choice_none_leaves_the_text_unparsed(v3):
    v3.script(CALL_TEXT)
    choice = v3.chat(messages=USER, tools=[WEATHER_TOOL], tool_choice="none").choices[0]
    assert (choice.finish_reason, choice.message.tool_calls, choice.message.content) == ("stop", None, CALL_TEXT)


def test_required_and_named_tool_choice_let_a_valid_call_through(v3):
    v3.script(CALL_TEXT[CALL_TEXT.index(CALLS_BEGIN):].replace(ARGS, ARGS.replace(" ", "")))  # the grammar's JSON
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        out = v3.chat(messages=USER, tools=[WEATHER_TOOL], tool_choice=choice).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.tool_calls[0].function.name == "get_weather"


def test_tool_calls_and_tool_results_in_the_history_render_through_v3s_template(v3):
    v3.script("It is 22 degrees.")
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]
    out = v3.chat(messages=history, tools=[WEATHER_TOOL])
    # DeepSeek-V3's format, written out by hand (its template closes the calls block only after a second call)
    expected = ("<｜begin▁of▁sentence｜><｜User｜>What is the weather in Paris?<｜Assistant｜>" + CALLS_BEGIN +
                f"{CALL_BEGIN}function{SEP}get_weather\n```json\n{ARGS}\n```{CALL_END}"
                '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temperature": 22}<｜tool▁output▁end｜>'
                "<｜tool▁outputs▁end｜>")
    assert out.usage.prompt_tokens == len(v3.tok.encode(expected, add_special_tokens=False))
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == ("It is 22 degrees.", "stop")


def test_tools_reach_the_template(scripted_sampler):
    """vLLM's DeepSeek-V3 tool template lists the tools; tool_choice none leaves them out."""
    from transformers import AutoTokenizer

    tok, http = serve("vllm_tool_chat_template_deepseekv3.jinja", tool_parser="deepseek_v3")
    ref = AutoTokenizer.from_pretrained(BUNDLED)
    ref.chat_template = tok.chat_template
    with http:
        client = Client(tok, http, scripted_sampler)
        client.script("ok")
        for choice, tools in (("auto", [WEATHER_TOOL]), ("none", None)):
            used = client.chat(messages=USER, tools=[WEATHER_TOOL], tool_choice=choice).usage.prompt_tokens
            text = ref.apply_chat_template(USER, tools=tools, tokenize=False, add_generation_prompt=True)
            assert used == len(tok.encode(text, add_special_tokens=False)), choice
        assert '"get_weather"' in ref.apply_chat_template(USER, tools=[WEATHER_TOOL], tokenize=False)


# ---- reasoning -------------------------------------------------------------------------------------------------
def test_r1_reasoning_goes_to_reasoning_content_streamed_or_not(r1):
    r1.script("The user asks about Paris.\n</think>\n\nParis is sunny.")
    message = r1.chat(messages=USER).choices[0].message
    assert message.reasoning_content == "The user asks about Paris.\n"
    assert message.content == "\n\nParis is sunny."
    streamed, reason = r1.stream(messages=USER)
    assert reason == "stop"
    assert (streamed["reasoning_content"], streamed["content"]) == (message.reasoning_content, message.content)


def test_r1_thinks_then_calls_a_tool(r1):
    r1.script(f"I need the weather tool.</think>{CALL_TEXT}")
    choice = r1.chat(messages=USER, tools=[WEATHER_TOOL]).choices[0]
    assert choice.message.reasoning_content == "I need the weather tool."
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.arguments == ARGS
    streamed, reason = r1.stream(messages=USER, tools=[WEATHER_TOOL])
    assert reason == "tool_calls" and streamed["reasoning_content"] == "I need the weather tool."
    assert streamed["tool_calls"][0]["args"] == ARGS and streamed["content"] == "Let me check."


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice", "'get_time', which is not in tools"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools", "more than one function named 'get_weather'"),
    ({"tools": [{"type": "function"}]}, "tools.0.function", "Field required"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "'function'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": {"get_weather": {}}}, "tools", "list"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice", "allowed: 'none', 'auto'"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function"}}, "tool_choice", "{'name': NAME}"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", "only assistant messages call tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "Field required"),
    ({"messages": [{"role": "tool", "tool_call_id": "c"}]}, "messages.0.content", "without content"),
])
def test_bad_tool_requests_get_400_naming_the_problem(v3, body, param, words):
    response = v3.http.post("/v1/chat/completions", json={"messages": USER, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param), error
    assert words in error["message"], error


def test_tools_on_a_server_without_a_tool_parser_get_400(scripted_sampler):
    tok, http = serve("deepseek_v3.jinja")
    with http:
        response = http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL]})
        assert response.status_code == 400 and "--tool-call-parser" in response.json()["error"]["message"]
        Client(tok, http, scripted_sampler).script("fine")
        response = http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL],
                                                           "tool_choice": "none"})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "fine"


def test_an_unknown_parser_flag_is_a_cli_error_listing_the_allowed_ones(capsys):
    from openseek.cli import build_parser

    cases = (("--tool-call-parser", "'deepseek_v3', 'deepseek_v31'"), ("--reasoning-parser", "'deepseek_r1'"))
    for flag, allowed in cases:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["serve", flag, "hermes"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: invalid choice: 'hermes'" in err and allowed in err, err


def test_unknown_parser_names_are_refused_before_serving():
    with pytest.raises(ValueError, match="known: deepseek_r1"):
        build_app(AsyncEngine(LLMEngine.from_pretrained(BUNDLED)), "ds", reasoning_parser="deepseek")


# ---- tool_choice "required" / named: a grammar (tests/test_constrained_chat.py drives the real model) ------------
def test_an_output_that_breaks_required_is_refused_by_its_grammar(v3):
    """The scripted text is drawn past the mask: the grammar's matcher refuses it, failing that request alone."""
    v3.script("I would rather not call anything.")
    response = v3.http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL],
                                                          "tool_choice": "required"})
    assert response.status_code == 500 and "grammar refused token" in response.json()["error"]["message"]
    v3.script("fine")
    assert v3.chat(messages=USER).choices[0].message.content == "fine"


def test_unmet_tool_choice_names_what_is_wrong():
    from openseek.server.parsers import ToolCall
    from openseek.server.tools import NamedToolChoice, Tool, unmet_tool_choice

    tools = [Tool.model_validate(WEATHER_TOOL)]
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
    call = lambda name, args: [ToolCall("call_x", name, args, True)]  # noqa: E731
    assert unmet_tool_choice("required", tools, call("get_weather", ARGS)) is None
    assert unmet_tool_choice(named, tools, call("get_weather", '{"location": "Oslo"}')) is None
    assert "called no tool" in unmet_tool_choice("required", tools, [])
    assert "not 'get_weather'" in unmet_tool_choice(named, tools, call("get_time", "{}"))
    assert "not in tools" in unmet_tool_choice("required", tools, call("get_time", "{}"))
    assert "not JSON" in unmet_tool_choice("required", tools, call("get_weather", '{"location": '))
    pytest.importorskip("jsonschema")  # optional: without it, only the JSON is checked
    assert "'location' is a required property" in unmet_tool_choice("required", tools, call("get_weather", "{}"))
    assert "is not one of" in unmet_tool_choice("required", tools,
                                                call("get_weather", '{"location": "Oslo", "unit": "kelvin"}'))


def test_a_tokenizer_that_drops_the_tags_is_warned_about(caplog):
    """A checkpoint whose tokenizer marks </think> special would lose it from decoded text: say so at start."""
    from tokenizers import AddedToken

    engine = LLMEngine.from_pretrained(BUNDLED)
    with caplog.at_level("WARNING", logger="openseek.server.serving"):
        build_app(AsyncEngine(engine), "ds", reasoning_parser="deepseek_r1", tool_parser="deepseek_v3")
    assert "drops" not in caplog.text  # the bundled tokenizer spells the tags in bytes: nothing lost
    engine.tokenizer._tok.add_tokens([AddedToken("</think>", special=True)])
    with caplog.at_level("WARNING", logger="openseek.server.serving"):
        build_app(AsyncEngine(engine), "ds", reasoning_parser="deepseek_r1")
    assert "drops </think> when decoding" in caplog.text and "skip_special_tokens=false" in caplog.text
