"""OpenAI API schemas: requests as pydantic models, their SamplingParams, prompts, and the response objects.

Every problem a client can cause becomes an `APIError`: an HTTP status plus OpenAI's error body
{"error": {"message", "type", "param", "code"}}. Field names and defaults follow OpenAI's API; the extra sampling
fields (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
structured_outputs) follow vLLM's extensions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from ..engine import SamplingParams, StructuredOutputsParams
from ..validation import FieldError
from .constraints import ResponseFormat, StructuredOutputs, for_chat, requested
from .tools import NamedToolChoice, Tool, ToolCallItem, choice_text, forces_a_call

TokenStr = Callable[[int], str]  # token id -> its text, as shown in logprobs


class APIError(Exception):
    """A request the server refuses, answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def check_unicode(value: Any, path: str = "") -> None:
    """Refuse a string that UTF-8 cannot encode (a lone surrogate: JSON's "\\ud800" parses to one) with a 400
    naming its field, before a tokenizer or a JSON reply meets it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path or 'the body'} holds a lone surrogate (U+{ord(value[e.start]):04X}) at "
                                f"character {e.start}: strings must be valid Unicode", path or None) from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            check_unicode(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, path)  # first, so that the path below can name it
            check_unicode(v, f"{path}.{k}")
    elif isinstance(value, list) and not (value and isinstance(value[0], int)):  # token ids hold no text
        for i, v in enumerate(value):
            check_unicode(v, f"{path}.{i}")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(slots=True, frozen=True)
class Pricing:
    input: float  # per million prompt tokens
    output: float  # per million completion tokens
    currency: str = "USD"


# ---- requests ------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def structured_param(self) -> str:
        """The field a grammar came from, which a 400 about it names."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def _structured(self, **chat) -> StructuredOutputsParams | None:
        """The constraint response_format / structured_outputs asks for (chat's adds tools and reasoning)."""
        return requested(self.response_format, self.structured_outputs)

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's token id strings as ints (the engine checks the range)."""
        if self.logit_bias is None:
            return None
        bias = {}
        for k, v in self.logit_bias.items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids (integers as strings): got {k!r}",
                               "logit_bias") from None
        return bias

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                names: dict[str, str] | None = None, **chat) -> SamplingParams:
        fields = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "top_k",
                  "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens")
        kw: dict[str, Any] = {k: v for k in fields if (v := getattr(self, k)) is not None}
        kw.update(max_tokens=max_tokens, logprobs=logprobs, logit_bias=self._logit_bias())
        if prompt_logprobs is not None:
            kw["prompt_logprobs"] = prompt_logprobs
        try:
            kw["structured_outputs"] = self._structured(**chat)
            return SamplingParams(**kw)
        except FieldError as e:
            field = self.structured_param if e.field.startswith("structured_outputs") else e.field
            raise APIError(400, str(e), (names or {}).get(field, field)) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_params(self) -> SamplingParams:
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of={self.best_of} is not supported: only best_of == n", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (scoring the prompt)", "max_tokens")
        # max_tokens=0 with echo scores the prompt: one token is generated and not returned
        max_tokens = 1 if self.max_tokens == 0 else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        return self._params(max_tokens, self.logprobs, prompt_logprobs)

    def prompts(self, tokenizer, max_chars: int) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt: a string, a list of token ids, or a list of either.

        Every text is checked against max_chars before any is tokenized (tokenizing megabytes takes seconds).
        """
        p = self.prompt
        items = [p] if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) else list(p)
        if not items:
            raise APIError(400, "prompt is empty", "prompt")
        texts = [item for item in items if isinstance(item, str)]
        if texts and tokenizer is None:
            raise APIError(400, "this model folder has no tokenizer.json: send prompts as token ids", "prompt")
        for text in texts:
            check_chars(len(text), max_chars, "prompt")
        return [(item, tokenizer.encode(item)) if isinstance(item, str) else (None, list(item)) for item in items]


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message answers this call

    def for_template(self, i: int) -> dict:
        """The message as the chat template sees it: content flattened to one string (text parts joined by \\n).

        An assistant message with tool calls keeps content None when it has no text: DeepSeek's templates test
        `message['content'] is none` to write the calls alone.
        """
        content = self.content
        if isinstance(content, list):
            if bad := [p.type for p in content if p.type != "text" or p.text is None]:
                raise APIError(400, f"messages[{i}] has a content part of type {bad[0]!r}; only text parts are "
                                    "supported", f"messages.{i}.content")
            content = "\n".join(p.text for p in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            if self.role != "assistant":
                raise APIError(400, f"messages[{i}] has tool_calls but role {self.role!r}: only assistant messages "
                                    "call tools", f"messages.{i}.tool_calls")
            out["content"] = content or None
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.role == "tool" and self.content is None:
            raise APIError(400, f"messages[{i}] is a tool message without content: send the tool's result",
                           f"messages.{i}.content")
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out

    def chars(self) -> int:
        """Characters of text the template gets from this message."""
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        content = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or ())
        return len(content) + len(self.name or "") + calls


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: "required" allows exactly one call

    def to_params(self, tool_parser: str | None = None, reasoning_end: str | None = None) -> SamplingParams:
        """The engine's parameters; a forced tool_choice (checked by check_tools first) or a response format
        becomes a grammar that applies after reasoning_end, the reasoning parser's end tag, when there is one."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        use_completion = self.max_completion_tokens is not None
        max_tokens = self.max_completion_tokens if use_completion else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        names = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens" if use_completion else "max_tokens"}
        return self._params(max_tokens, logprobs, names=names, tool_parser=tool_parser, reasoning_end=reasoning_end)

    def _structured(self, tool_parser: str | None = None, reasoning_end: str | None = None
                    ) -> StructuredOutputsParams | None:
        return for_chat(self.response_format, self.structured_outputs, self.tools, self.tool_choice,
                        self.parallel_tool_calls is not False, tool_parser, reasoning_end)

    @property
    def structured_param(self) -> str:
        return "tools" if forces_a_call(self.tool_choice) else super().structured_param

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value):
        """One message for any wrong shape, instead of pydantic's one per member of the union."""
        ok = value is None or value in ("none", "auto", "required") or (
            isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict)
            and isinstance(value["function"].get("name"), str))
        if not ok:
            raise ValueError(f"got {value!r}; allowed: 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': NAME}}")
        return value

    @property
    def uses_tools(self) -> bool:
        """Whether the model is shown the tools and its output parsed for calls (tool_choice "none": neither)."""
        return bool(self.tools) and self.tool_choice != "none"

    def check_tools(self, tool_parser: str | None) -> None:
        """tool_choice against tools and the server's parser, with a 400 naming the problem."""
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise APIError(400, f"tool_choice={choice_text(choice)} needs tools: the request has none", "tool_choice")
        names = [t.function.name for t in self.tools or ()]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise APIError(400, f"tools has more than one function named {dup[0]!r}", "tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                                f"({', '.join(map(repr, names))})", "tool_choice")
        if self.uses_tools and tool_parser is None:
            raise APIError(400, "this server parses no tool calls: start it with --tool-call-parser to use tools "
                                "(or send tool_choice='none')", "tools")

    def prompt_ids(self, tokenizer, max_chars: int) -> list[int]:
        """The rendered chat template, tokenized; the template already starts with BOS.

        The messages' text is checked against max_chars first: the template only adds to it.
        """
        if tokenizer is None:
            raise APIError(400, "this model folder has no tokenizer.json, so it cannot render chat messages; use "
                                "/v1/completions with token ids", "messages")
        if not self.messages:
            raise APIError(400, "messages is empty", "messages")
        messages = [m.for_template(i) for i, m in enumerate(self.messages)]
        check_chars(sum(m.chars() for m in self.messages), max_chars, "messages")
        # as transformers and vLLM pass them: the tool objects as the client sent them, None when unused
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.uses_tools else None
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from e
        return tokenizer.encode(text, add_special_tokens=False)


def check_chars(n: int, max_chars: int, param: str) -> None:
    if n > max_chars:
        raise APIError(400, f"{param} has {n} characters; more than {max_chars} (max_model_len x the longest token) "
                            "cannot fit in max_model_len tokens", param)


# ---- responses -----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, pricing: Pricing | None) -> dict:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if pricing is not None:
        cin, cout = prompt_tokens * pricing.input / 1e6, completion_tokens * pricing.output / 1e6
        out["cost"] = {"input": cin, "output": cout, "total": cin + cout, "currency": pricing.currency}
    return out


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float] | None], token_str: TokenStr,
                        offset: int = 0) -> dict:
    """The legacy completions logprobs object; an entry of None (the first prompt token) gives null logprobs."""
    tokens = [token_str(t) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e[t] for t, e in zip(token_ids, entries)],
            "top_logprobs": [None if e is None else {token_str(k): v for k, v in e.items()} for e in entries],
            "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], top_n: int, token_str: TokenStr,
                  token_bytes: Callable[[int], bytes]) -> dict:
    """The chat logprobs object: each sampled token with the top_n most likely ones."""

    def item(t: int, lp: float) -> dict:
        return {"token": token_str(t), "logprob": lp, "bytes": list(token_bytes(t))}

    content = []
    for t, e in zip(token_ids, entries):
        top = sorted(e.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**item(t, e[t]), "top_logprobs": [item(k, v) for k, v in top]})
    return {"content": content}


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


def completion_choice(index: int, text: str, finish_reason: FinishReason, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_message(content: str | None, reasoning: str | None = None, tool_calls: list[dict] | None = None) -> dict:
    """The assistant's message: reasoning_content only from a reasoning parser, tool_calls only when there are."""
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def chat_choice(index: int, message: dict, finish_reason: FinishReason, logprobs: dict | None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict, finish_reason: FinishReason, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response(object: str, id: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    """A completion / chat.completion / *.chunk object; usage None is left out (streamed chunks)."""
    out = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out
