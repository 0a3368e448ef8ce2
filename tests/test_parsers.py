"""The reasoning and tool-call parsers on DeepSeek's own token strings: whole outputs, every split into streamed
chunks, and the calls that DeepSeek-V3's real chat template writes (tests/data/deepseek_v3.jinja)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openseek.server.parsers import DeepSeekR1ReasoningParser, OutputParser, check_names
from openseek.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
BUNDLED = Path(__file__).parents[1] / "openseek" / "bundled"

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def v3_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


WEATHER, TIME = '{"location": "Beijing", "unit": "celsius"}', '{"tz": "Asia/Shanghai"}'
# vLLM's deepseekv3 docstring example: two calls joined by "\n", as V3's template writes them
V3_TWO = f"Let me look.{CALLS_BEGIN}{v3_call('get_weather', WEATHER)}\n{v3_call('get_time', TIME)}{CALLS_END}"
V31_TWO = f"Let me look.{CALLS_BEGIN}{v31_call('get_weather', WEATHER)}{v31_call('get_time', TIME)}{CALLS_END}"


def stream(parser: OutputParser, chunks: list[str]) -> tuple[str, str, list[dict]]:
    """(reasoning, content, tool-call deltas) pushed chunk by chunk."""
    deltas = [parser.push(c) for c in chunks] + [parser.finish()]
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas),
            [t for d in deltas for t in d.tool_calls])


def assemble(deltas: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) per call, put together from streamed deltas as a client does (by index): a call's first
    delta has its id, type and name (and the arguments that came in the same chunk), later ones argument pieces."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if "id" in d:
            assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["name"], d
            calls[d["index"]] = [d["function"]["name"], ""]
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
        calls[d["index"]][1] += d["function"]["arguments"]
    return [tuple(calls[i]) for i in sorted(calls)]


# ---- reasoning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reasoning, content", [
    ("Let me think.\n</think>\n\nParis.", "Let me think.\n", "\n\nParis."),  # R1: <think> was in the prompt
    ("<think>\nhmm</think>Paris.", "\nhmm", "Paris."),  # the output opens the block itself
    ("still thinking when cut", "still thinking when cut", None),  # no end tag: all reasoning, as vLLM
    ("done</think>", "done", None),
    ("a</think>b</think><think>c", "a", "b</think><think>c"),  # after the first end tag, text is verbatim
    ("x <thi", "x <thi", None),  # a partial tag that never completes is text
])
def test_r1_splits_reasoning_at_the_first_end_tag(text, reasoning, content):
    parsed = OutputParser("deepseek_r1", None).parse(text)
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == (reasoning, content, [])


def test_a_think_tag_split_across_two_chunks_is_held_back_not_leaked():
    parser = DeepSeekR1ReasoningParser()
    assert parser.push("The sky is blue.</th") == ("The sky is blue.", "")
    assert parser.push("ink>\n\nBlue.") == ("", "\n\nBlue.")
    assert parser.finish() == ("", "")
    parser = DeepSeekR1ReasoningParser()
    assert parser.push("<thi") == ("", "")
    assert parser.push("nk>why") == ("why", "")


@pytest.mark.parametrize("text", ["Let me think.\n</think>\n\nParis.", "<think>\nhmm</think>Paris.", "a</think>b",
                                  "x <thi", "<<think></</think>>"])
def test_r1_streamed_at_every_cut_equals_the_whole(text):
    whole = OutputParser("deepseek_r1", None).parse(text)
    for cut in range(len(text) + 1):
        reasoning, content, _ = stream(OutputParser("deepseek_r1", None), [text[:cut], text[cut:]])
        assert (reasoning or None, content or None) == (whole.reasoning, whole.content), cut
    reasoning, content, _ = stream(OutputParser("deepseek_r1", None), list(text))
    assert (reasoning or None, content or None) == (whole.reasoning, whole.content)


# ---- tool calls ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [("deepseek_v3", V3_TWO), ("deepseek_v31", V31_TWO)])
def test_tool_calls_become_openai_calls_with_json_arguments(name, text):
    parsed = OutputParser(None, name).parse(text)
    assert parsed.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"location": "Beijing", "unit": "celsius"}), ("get_time", {"tz": "Asia/Shanghai"})]
    assert len({c.id for c in parsed.tool_calls}) == 2 and all(c.id.startswith("call_") for c in parsed.tool_calls)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v31"])
def test_text_without_calls_is_content_unchanged(name):
    text = "No tools needed: <｜tool but not a tag, and ``` fences\n"
    parsed = OutputParser(None, name).parse(text)
    assert (parsed.content, parsed.tool_calls) == (text, [])


@pytest.mark.parametrize("name, text", [("deepseek_v3", V3_TWO), ("deepseek_v31", V31_TWO)])
def test_streamed_calls_at_every_cut_equal_the_whole(name, text):
    whole = OutputParser(None, name).parse(text)
    expected = [(c.name, c.arguments) for c in whole.tool_calls]
    for cut in range(len(text) + 1):
        _, content, deltas = stream(OutputParser(None, name), [text[:cut], text[cut:]])
        assert (content, assemble(deltas)) == (whole.content, expected), cut
    _, content, deltas = stream(OutputParser(None, name), list(text))
    assert (content, assemble(deltas)) == (whole.content, expected)


def test_a_tool_tag_split_across_two_chunks_leaks_nothing_into_content():
    parser = OutputParser(None, "deepseek_v3")
    first = parser.push("Checking." + CALLS_BEGIN[:7])
    assert (first.content, first.tool_calls) == ("Checking.", [])
    second = parser.push(CALLS_BEGIN[7:] + CALL_BEGIN + "function" + SEP[:4])
    assert (second.content, second.tool_calls) == ("", [])
    third = parser.push(SEP[4:] + "get_time\n```json\n{\"tz\": ")
    assert third.tool_calls[0]["function"] == {"name": "get_time", "arguments": '{"tz": '}
    fourth = parser.push('"UTC"}\n``')  # the start of the closing fence is held back
    assert fourth.tool_calls == [{"index": 0, "function": {"arguments": '"UTC"}'}}]
    end = parser.push("`" + CALL_END + CALLS_END)
    assert (end.content, end.tool_calls) == ("", []) and parser.called_tools


@pytest.mark.parametrize("name, make", [("deepseek_v3", v3_call), ("deepseek_v31", v31_call)])
def test_a_call_cut_by_max_tokens_is_not_a_complete_call(name, make):
    done = make("get_time", TIME)
    text = f"{CALLS_BEGIN}{done}{make('get_weather', WEATHER)}"
    cut = text[:-len(CALL_END) - 6]  # inside the second call's arguments
    parser = OutputParser(None, name)
    parsed = parser.parse(cut)
    assert [c.name for c in parsed.tool_calls] == ["get_time"] and parsed.content is None
    assert [c.complete for c in parser.tools.calls] == [True, False]
    header_only = OutputParser(None, name)
    assert header_only.parse(f"{CALLS_BEGIN}{CALL_BEGIN}get_").tool_calls == [] and not header_only.called_tools


def test_reasoning_then_a_tool_call():
    text = f"The user wants weather.</think>\n\n{CALLS_BEGIN}{v3_call('get_weather', WEATHER)}{CALLS_END}"
    parsed = OutputParser("deepseek_r1", "deepseek_v3").parse(text)
    assert parsed.reasoning == "The user wants weather."
    assert parsed.content == "\n\n" and [c.name for c in parsed.tool_calls] == ["get_weather"]
    reasoning, content, deltas = stream(OutputParser("deepseek_r1", "deepseek_v3"), list(text))
    assert (reasoning, content, assemble(deltas)) == ("The user wants weather.", "\n\n", [("get_weather", WEATHER)])


def test_the_parser_reads_the_calls_deepseek_v3s_template_writes():
    tok = Tokenizer.from_pretrained(BUNDLED)
    tok.chat_template = (DATA / "deepseek_v3.jinja").read_text(encoding="utf-8")
    user = [{"role": "user", "content": "Weather and time in Beijing?"}]
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
             for i, (n, a) in enumerate([("get_weather", WEATHER), ("get_time", TIME)])]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True)
    history = tok.apply_chat_template(user + [{"role": "assistant", "content": None, "tool_calls": calls}],
                                      add_generation_prompt=False)
    assert history.startswith(prompt) and prompt.endswith("<｜Assistant｜>")
    written = history[len(prompt):]  # what the model was trained to write after the generation prompt
    assert written.startswith(CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n")
    parsed = OutputParser(None, "deepseek_v3").parse(written)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", WEATHER), ("get_time", TIME)]


def test_unknown_parser_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown tool-call parser 'hermes'; known: deepseek_v3, deepseek_v31"):
        check_names(None, "hermes")
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen3'; known: deepseek_r1"):
        check_names("qwen3", None)
