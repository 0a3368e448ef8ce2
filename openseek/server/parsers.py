"""Reasoning and tool-call parsers: a model's raw text -> OpenAI's reasoning_content, content and tool_calls.

A parser object holds one choice's streaming state: `push()` the text as it arrives, `finish()` once at the end;
`parse()` is push + finish over the whole text, so a streamed answer and an unstreamed one agree by construction.
Tags are matched in the text, not by token id: a tokenizer without DeepSeek's added tokens spells a tag in several
tokens, so a tag split across two pushes is held back until it is complete or cannot be one. The names are vLLM's
`--reasoning-parser` and `--tool-call-parser` names, and so is the behaviour, except where a docstring says.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


def _held(text: str, tags: tuple[str, ...]) -> int:
    """Characters at the end of text that could start one of tags (a proper prefix of it): held back for now."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) and n < len(t) for t in tags):
            return n
    return 0


# ---- reasoning -----------------------------------------------------------------------------------------------
class DeepSeekR1ReasoningParser:
    """Text up to the first `</think>` is reasoning, the rest content (vLLM's deepseek_r1).

    R1's template ends the prompt with "<think>\\n", so the output usually has only the end tag; an output that
    opens the block itself has its `<think>` tags dropped. An output with no `</think>` is all reasoning.
    """

    start, end = "<think>", "</think>"

    def __init__(self):
        self._buf = ""
        self.in_reasoning = True

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that text completes."""
        if not self.in_reasoning:
            return "", text
        buf = self._buf + text
        i = buf.find(self.end)
        if i >= 0:
            self._buf, self.in_reasoning = "", False
            return buf[:i].replace(self.start, ""), buf[i + len(self.end):]
        keep = _held(buf, (self.start, self.end))
        self._buf = buf[len(buf) - keep:]
        return buf[:len(buf) - keep].replace(self.start, ""), ""

    def finish(self) -> tuple[str, str]:
        """What push() held back: a partial tag that never completed is reasoning text."""
        held, self._buf = self._buf, ""
        return held, ""


# ---- tool calls ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False  # its closing tag was seen; a call cut by max_tokens stays incomplete

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _DeepSeekToolParser:
    """DeepSeek's tool-call tags; subclasses say how one call's header (its name) and arguments are written.

    Text before the calls-begin tag is content; text after the calls-end tag is dropped (as vLLM does). A call
    streams as OpenAI's deltas: first {index, id, type, function: {name, arguments: ""}}, then argument pieces.
    """

    calls_begin, calls_end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    args_end: str  # what closes a call's arguments
    between = ""  # what the chat template writes between two calls

    @classmethod
    def call_parts(cls, name: str) -> tuple[str, str]:
        """(the text before a call's arguments, the text after them), as the chat template writes the call."""
        raise NotImplementedError

    def __init__(self):
        self._buf, self._state = "", "content"
        self.calls: list[ToolCall] = []

    def header(self, buf: str) -> tuple[str, int] | None:
        """(function name, characters the header takes) once buf holds a call's whole header, else None."""
        raise NotImplementedError

    def push(self, text: str) -> tuple[str, list[dict]]:
        """(content, tool-call deltas) that text completes."""
        self._buf += text
        content: list[str] = []
        deltas: list[dict] = []
        while self._buf and getattr(self, f"_in_{self._state}")(content, deltas):
            pass
        return "".join(content), _merge(deltas)

    def finish(self) -> tuple[str, list[dict]]:
        """Held-back content; a call still open (cut by max_tokens) stays incomplete and gets nothing more."""
        held, self._buf = self._buf, ""
        return (held if self._state == "content" else ""), []

    def _in_content(self, content: list[str], deltas: list[dict]) -> bool:
        i = self._buf.find(self.calls_begin)
        if i < 0:
            keep = _held(self._buf, (self.calls_begin,))
            content.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        content.append(self._buf[:i])
        self._buf, self._state = self._buf[i + len(self.calls_begin):], "calls"
        return True

    def _in_calls(self, content: list[str], deltas: list[dict]) -> bool:
        buf = self._buf.lstrip()  # DeepSeek-V3's template puts "\n" between calls
        for tag, state in ((self.call_begin, "header"), (self.calls_end, "done")):
            if buf.startswith(tag):
                self._buf, self._state = buf[len(tag):], state
                return True
        self._buf = buf
        if not buf or self.call_begin.startswith(buf) or self.calls_end.startswith(buf):
            return False  # a tag still arriving
        i = buf.find("<", 1)  # stray text between calls: skip to the next thing that may be a tag
        self._buf = buf[i:] if i > 0 else ""
        return True

    def _in_header(self, content: list[str], deltas: list[dict]) -> bool:
        found = self.header(self._buf)
        if found is None:
            return False
        name, used = found
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, "id": call.id, "type": "function",
                       "function": {"name": name, "arguments": ""}})
        self._buf, self._state = self._buf[used:], "args"
        return True

    def _in_args(self, content: list[str], deltas: list[dict]) -> bool:
        call = self.calls[-1]
        i = self._buf.find(self.args_end)
        if i < 0:
            keep = _held(self._buf, (self.args_end,))
            piece, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        else:
            piece, self._buf = self._buf[:i], self._buf[i + len(self.args_end):]
            call.complete, self._state = True, "calls"
        if piece:
            call.arguments += piece
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
        return call.complete

    def _in_done(self, content: list[str], deltas: list[dict]) -> bool:
        self._buf = ""
        return False


def _merge(deltas: list[dict]) -> list[dict]:
    """One entry per call in a chunk: a call's argument pieces join its previous entry."""
    out: list[dict] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["function"]["arguments"]
        else:
            out.append(d)
    return out


class DeepSeekV3ToolParser(_DeepSeekToolParser):
    """`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>` (DeepSeek-V3, R1)."""

    fence = "\n```json\n"
    args_end = "\n```" + _DeepSeekToolParser.call_end
    between = "\n"

    @classmethod
    def call_parts(cls, name: str) -> tuple[str, str]:
        return f"{cls.call_begin}function{cls.sep}{name}{cls.fence}", cls.args_end

    def header(self, buf: str) -> tuple[str, int] | None:
        i = buf.find(self.sep)
        j = buf.find(self.fence, i + len(self.sep)) if i >= 0 else -1
        return None if j < 0 else (buf[i + len(self.sep):j].strip(), j + len(self.fence))


class DeepSeekV31ToolParser(_DeepSeekToolParser):
    """`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (DeepSeek-V3.1)."""

    args_end = _DeepSeekToolParser.call_end

    @classmethod
    def call_parts(cls, name: str) -> tuple[str, str]:
        return f"{cls.call_begin}{name}{cls.sep}", cls.args_end

    def header(self, buf: str) -> tuple[str, int] | None:
        i = buf.find(self.sep)
        return None if i < 0 else (buf[:i].strip(), i + len(self.sep))


REASONING_PARSERS = {"deepseek_r1": DeepSeekR1ReasoningParser}
TOOL_PARSERS = {"deepseek_v3": DeepSeekV3ToolParser, "deepseek_v31": DeepSeekV31ToolParser}


def tags(reasoning: str | None, tool: str | None) -> list[str]:
    """The tag strings the named parsers look for in the text."""
    out = [REASONING_PARSERS[reasoning].start, REASONING_PARSERS[reasoning].end] if reasoning else []
    if tool:
        cls = TOOL_PARSERS[tool]
        out += [cls.calls_begin, cls.call_begin, cls.sep, cls.call_end, cls.calls_end]
    return out


def check_names(reasoning: str | None, tool: str | None) -> None:
    """Raise ValueError naming an unknown parser and the known ones."""
    for kind, name, known in (("reasoning", reasoning, REASONING_PARSERS), ("tool-call", tool, TOOL_PARSERS)):
        if name is not None and name not in known:
            raise ValueError(f"unknown {kind} parser {name!r}; known: {', '.join(sorted(known))}")


# ---- one choice ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's streamed tool-call entries

    def extend(self, other: Delta) -> Delta:
        self.reasoning, self.content = self.reasoning + other.reasoning, self.content + other.content
        self.tool_calls = _merge(self.tool_calls + other.tool_calls)
        return self

    def openai(self) -> dict:
        """The chunk's delta object; empty when there is nothing to send."""
        out: dict = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass(slots=True)
class Parsed:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]  # complete calls only


class OutputParser:
    """One choice's parsers chained: reasoning first, then tool calls in the text that follows it."""

    def __init__(self, reasoning: str | None, tool: str | None):
        check_names(reasoning, tool)
        self.reasoning = REASONING_PARSERS[reasoning]() if reasoning else None
        self.tools = TOOL_PARSERS[tool]() if tool else None

    def push(self, text: str) -> Delta:
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        return self._tool_delta(reasoning, content, finish=False)

    def finish(self) -> Delta:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        return self._tool_delta(reasoning, content, finish=True)

    def _tool_delta(self, reasoning: str, content: str, finish: bool) -> Delta:
        if self.tools is None:
            return Delta(reasoning, content)
        content, calls = self.tools.push(content)
        if finish:
            more, _ = self.tools.finish()
            content += more
        return Delta(reasoning, content, calls)

    @property
    def called_tools(self) -> bool:
        """Whether a complete tool call was parsed: then a stopped choice's finish_reason is "tool_calls"."""
        return self.tools is not None and any(c.complete for c in self.tools.calls)

    def parse(self, text: str) -> Parsed:
        """The whole output at once (a fresh parser)."""
        whole = self.push(text).extend(self.finish())
        reasoning, content = whole.reasoning, whole.content
        calls = [c for c in self.tools.calls if c.complete] if self.tools else []
        if self.reasoning is not None or calls:
            content = content or None  # vLLM's convention: no text after the reasoning / before the calls is null
        return Parsed(reasoning or None, content, calls)
