"""The two generation routes, transport-free: submit a request's prompts, then collect or stream their deltas.

One HTTP request becomes one engine request per prompt, with the request's n: the engine fans out, and choice
index = prompt index * n + completion index. Everything a client can get wrong is raised as APIError before
anything is streamed; once a stream has started, an engine failure is sent as an SSE error event. A request the
engine failed (its last delta's finish_reason is "error") fails that HTTP request alone: a 500, or an SSE error
event that ends its stream.

Prompts are tokenized (and chat templates rendered) in a worker thread: on the event loop, a megabyte prompt
would stall every other client, /health included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine import QueueFull, RequestOutput, SamplingParams, StepOutput
from ..validation import FieldError
from . import protocol as p
from .async_engine import AsyncEngine, Draining, EngineFailed
from .metrics import Metrics
from .parsers import REASONING_PARSERS, OutputParser, ToolCall, check_names, tags
from .tools import choice_text, forces_a_call, unmet_tool_choice

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    """One HTTP request's engine requests, one per prompt, in prompt order."""
    id: str
    model: str
    created: int
    n: int
    request_ids: list[str]
    prompts: list[tuple[str | None, list[int]]]  # (text or None, token ids) per prompt
    deltas: asyncio.Queue
    num_prompt_tokens: int
    arrival: float  # perf_counter when the request came in, for time to first token
    unfinished: set[str]  # request ids not finished (nor aborted) yet
    error: str | None = None  # what failed, once the engine failed one of its requests
    outputs: dict[str, RequestOutput] = field(default_factory=dict)  # finished ones, as the engine returns them
    last_token: dict[tuple[str, int], float] = field(default_factory=dict)  # perf_counter per completion, for ITL

    def prompt_of(self, request_id: str) -> int:
        return self.request_ids.index(request_id)

    def choice_index(self, request_id: str, index: int) -> int:
        return self.prompt_of(request_id) * self.n + index

    def finished(self) -> list[tuple[int, RequestOutput]]:
        """(prompt index, output) of every request, in prompt order; all must have finished."""
        return [(i, self.outputs[rid]) for i, rid in enumerate(self.request_ids)]


def _engine_error(e: EngineFailed) -> p.APIError:
    return p.APIError(500, str(e), None, "server_error", "server_error")


def _longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry (a byte-level entry has one per byte, so at least the text's)."""
    return max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size))


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics, pricing: p.Pricing | None = None,
                 reasoning_parser: str | None = None, tool_parser: str | None = None):
        self.engine, self.model_name, self.metrics, self.pricing = engine, model_name, metrics, pricing
        check_names(reasoning_parser, tool_parser)
        self.reasoning_parser, self.tool_parser = reasoning_parser, tool_parser
        # a chat output's grammar applies after the reasoning: the model thinks freely first
        self.reasoning_end = REASONING_PARSERS[reasoning_parser].end if reasoning_parser else None
        self.tokenizer = engine.llm_engine.tokenizer
        _warn_dropped_tags(self.tokenizer, reasoning_parser, tool_parser)
        # a longer text cannot fit in max_model_len tokens, so it is refused before it is tokenized
        self.max_prompt_chars = engine.llm_engine.max_model_len * (_longest_token(self.tokenizer) if self.tokenizer
                                                                   else 0)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes: for a piece of a multi-byte character, not the U+FFFD its text decodes to."""
        if self.tokenizer is None:
            return self.token_str(token_id).encode("utf-8")
        return self.tokenizer.token_bytes(token_id)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise p.APIError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                             "model", "model_not_found")

    # ---- submission --------------------------------------------------------------------------------------
    async def submit(self, kind: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                     prompt_param: str, arrival: float) -> _Job:
        """Queue one engine request per prompt, or raise APIError (400 rejected, 429 queue full, 503, 500)."""
        job_id = p.new_id(kind)
        rids = [f"{job_id}-{i}" for i in range(len(prompts))]
        try:
            deltas = await self.engine.add([(rid, {"prompt_token_ids": ids}, params)
                                            for rid, (_, ids) in zip(rids, prompts)])
        except QueueFull as e:
            raise p.APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error") from e
        except Draining as e:
            raise p.APIError(503, str(e), None, "service_unavailable", "server_error") from e
        except EngineFailed as e:
            raise _engine_error(e) from e
        except FieldError as e:  # a request parameter: n asks for more sequences than can wait
            raise p.APIError(400, str(e), e.field) from e
        except ValueError as e:  # the engine names the problem: too long, empty, ids outside the vocabulary
            raise p.APIError(400, str(e), prompt_param) from e
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        return _Job(job_id, self.model_name, p.now(), params.n, rids, prompts, deltas, num_prompt_tokens, arrival,
                    set(rids))

    async def deltas(self, job: _Job) -> AsyncIterator[StepOutput]:
        """Each StepOutput as it arrives (finished requests' outputs kept); aborts the rest when closed early."""
        try:
            while job.unfinished:
                out = await job.deltas.get()
                if isinstance(out, Exception):
                    raise out
                if out.finish_reason == "error":  # the engine failed this request, and only this one
                    job.error = f"the engine failed this request: {out.error or 'no reason given'}"
                    raise EngineFailed(job.error)
                self._observe(job, out)
                if out.output is not None:
                    job.outputs[out.request_id] = out.output
                    job.unfinished.discard(out.request_id)
                yield out
        finally:
            self.abort(job)

    def abort(self, job: _Job) -> None:
        """Abort the job's unfinished requests (its client left); safe to call more than once."""
        self.engine.abort(sorted(job.unfinished))
        job.unfinished.clear()

    def _observe(self, job: _Job, out: StepOutput) -> None:
        t, key = time.perf_counter(), (out.request_id, out.index)
        if not job.last_token:
            self.metrics.ttft.observe(t - job.arrival)
        if key in job.last_token:
            self.metrics.itl.observe(t - job.last_token[key])
        job.last_token[key] = t

    async def collect(self, job: _Job) -> None:
        try:
            async with contextlib.aclosing(self.deltas(job)) as it:
                async for _ in it:
                    pass
        except Draining as e:
            raise p.APIError(503, str(e), None, "service_unavailable", "server_error") from e
        except EngineFailed as e:
            raise _engine_error(e) from e

    async def compile_grammar(self, req: p.CompletionRequest | p.ChatCompletionRequest, params: SamplingParams
                              ) -> None:
        """Compile the request's grammar in a worker thread, before it reaches the engine (which then finds it
        cached): a wide schema takes milliseconds, a pathological one far longer, and neither may stall the loop or
        the engine thread. A grammar that cannot compile is a 400 naming the field it came from."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(self.engine.llm_engine.compile_grammar, params.structured_outputs)
        except FieldError as e:
            raise p.APIError(400, f"{req.structured_param}: {e.allowed}", req.structured_param) from e

    def check_draining(self) -> None:
        """Refuse early, before tokenizing, while the server shuts down."""
        if self.engine.draining:
            raise p.APIError(503, "the server is shutting down", None, "service_unavailable", "server_error")

    def usage(self, job: _Job, completion_tokens: int) -> dict:
        return p.usage(job.num_prompt_tokens, completion_tokens, self.pricing)

    # ---- /v1/completions ---------------------------------------------------------------------------------
    async def create_completion(self, req: p.CompletionRequest) -> _Job:
        arrival = time.perf_counter()
        p.check_unicode(req)
        self.check_model(req.model)
        params = req.to_params()
        self.check_draining()
        await self.compile_grammar(req, params)
        prompts = await asyncio.to_thread(req.prompts, self.tokenizer, self.max_prompt_chars)
        return await self.submit("cmpl", prompts, params, "prompt", arrival)

    def _completion_piece(self, req: p.CompletionRequest, job: _Job, prompt: int, prompt_logprobs: list | None,
                          ids: list[int], entries: list, text: str, first: bool, offset: int
                          ) -> tuple[str, dict | None]:
        """Text and logprobs for a new piece of a choice; the first piece of an echo carries the prompt."""
        if req.max_tokens == 0:  # scoring only: the one generated token is not returned
            ids, entries, text = [], [], ""
        if req.echo and first:
            prompt_text, prompt_ids = job.prompts[prompt]
            ids = prompt_ids + ids
            entries = (prompt_logprobs or [None] * len(prompt_ids)) + entries
            text = self._prompt_text(prompt_text, prompt_ids) + text
        lp = None
        if req.logprobs is not None:
            lp = p.completion_logprobs(ids, entries, self.token_str, offset)
        return text, lp

    def _prompt_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    def completion_response(self, req: p.CompletionRequest, job: _Job) -> dict:
        choices, completion_tokens = [], 0
        for i, out in job.finished():
            for c in out.outputs:
                text, lp = self._completion_piece(req, job, i, out.prompt_logprobs, c.token_ids, c.logprobs or [],
                                                  c.text, True, 0)
                reason = "length" if req.max_tokens == 0 else c.finish_reason
                completion_tokens += 0 if req.max_tokens == 0 else len(c.token_ids)
                choices.append(p.completion_choice(i * job.n + c.index, text, reason, lp))
        return p.response("text_completion", job.id, job.created, job.model, choices,
                          self.usage(job, completion_tokens))

    async def stream_completion(self, req: p.CompletionRequest, job: _Job) -> AsyncIterator[bytes]:
        completion_tokens, offsets = 0, {}  # text characters streamed per choice, for logprobs text_offset
        async with contextlib.aclosing(self.deltas(job)) as it:
            try:
                async for out in it:
                    index = job.choice_index(out.request_id, out.index)
                    first = index not in offsets
                    text, lp = self._completion_piece(req, job, job.prompt_of(out.request_id), out.prompt_logprobs,
                                                      out.new_token_ids, out.new_logprobs or [], out.new_text, first,
                                                      offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    reason = "length" if req.max_tokens == 0 else out.finish_reason
                    completion_tokens += 0 if req.max_tokens == 0 else len(out.new_token_ids)
                    choice = p.completion_choice(index, text, reason, lp)
                    yield sse(p.response("text_completion", job.id, job.created, job.model, [choice], None))
            except (EngineFailed, Draining) as e:
                yield _error_event(job, e)
                return
        if req.include_usage:
            yield sse(p.response("text_completion", job.id, job.created, job.model, [],
                                 self.usage(job, completion_tokens)))
        yield sse("[DONE]")

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    async def create_chat(self, req: p.ChatCompletionRequest) -> _Job:
        arrival = time.perf_counter()
        p.check_unicode(req)
        self.check_model(req.model)
        req.check_tools(self.tool_parser)
        params = req.to_params(self.tool_parser, self.reasoning_end)
        self.check_draining()
        await self.compile_grammar(req, params)
        ids = await asyncio.to_thread(req.prompt_ids, self.tokenizer, self.max_prompt_chars)
        return await self.submit("chatcmpl", [(None, ids)], params, "messages", arrival)

    def _chat_logprobs(self, req: p.ChatCompletionRequest, ids: list[int], entries: list) -> dict | None:
        if not req.logprobs:
            return None
        return p.chat_logprobs(ids, entries, req.top_logprobs or 0, self.token_str, self.token_bytes)

    def output_parser(self, req: p.ChatCompletionRequest) -> OutputParser | None:
        """A fresh parser for one choice, or None when the server parses nothing for this request."""
        tool = self.tool_parser if req.uses_tools else None
        return OutputParser(self.reasoning_parser, tool) if self.reasoning_parser or tool else None

    def chat_response(self, req: p.ChatCompletionRequest, job: _Job) -> dict:
        (_, out), = job.finished()
        choices = []
        for c in out.outputs:
            message, reason = p.chat_message(c.text), c.finish_reason
            if (parser := self.output_parser(req)) is not None:
                parsed = parser.parse(c.text)
                calls = [t.openai() for t in parsed.tool_calls]
                message = p.chat_message(parsed.content, parsed.reasoning if parser.reasoning else None, calls)
                reason = _finish_reason(reason, parser)
                _check_tool_choice(req, parsed.tool_calls, reason)
            choices.append(p.chat_choice(c.index, message, reason, self._chat_logprobs(req, c.token_ids, c.logprobs)))
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return p.response("chat.completion", job.id, job.created, job.model, choices,
                          self.usage(job, completion_tokens))

    async def stream_chat(self, req: p.ChatCompletionRequest, job: _Job) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            return sse(p.response("chat.completion.chunk", job.id, job.created, job.model, choices, usage))

        completion_tokens, parsers = 0, {index: self.output_parser(req) for index in range(job.n)}
        async with contextlib.aclosing(self.deltas(job)) as it:
            for index in range(job.n):
                yield chunk([p.chat_delta_choice(index, {"role": "assistant", "content": ""}, None, None)])
            try:
                async for out in it:
                    completion_tokens += len(out.new_token_ids)
                    lp = self._chat_logprobs(req, out.new_token_ids, out.new_logprobs or [])
                    if (parser := parsers[out.index]) is None:
                        delta, reason = ({"content": out.new_text} if out.new_text or not out.finished else {},
                                         out.finish_reason)
                    else:
                        delta, reason = _parsed_delta(req, parser, out)
                        if not (delta or out.finished or lp):
                            continue  # held back: a tag may be arriving
                    yield chunk([p.chat_delta_choice(out.index, delta, reason, lp)])
            except (EngineFailed, Draining) as e:
                yield _error_event(job, e)
                return
        if req.include_usage:
            yield chunk([], self.usage(job, completion_tokens))
        yield sse("[DONE]")


def _warn_dropped_tags(tokenizer, reasoning_parser: str | None, tool_parser: str | None) -> None:
    """The parsers read decoded text: a tag the tokenizer marks special vanishes from it by default."""
    if tokenizer is None:
        return
    dropped = [t for t in tags(reasoning_parser, tool_parser)
               if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) != t]
    if dropped:
        logger.warning("the tokenizer drops %s when decoding (special tokens): the parsers only see them in requests "
                       "with skip_special_tokens=false", ", ".join(dropped))


def _parsed_delta(req: p.ChatCompletionRequest, parser: OutputParser, out: StepOutput) -> tuple[dict, str | None]:
    """A streamed piece through the choice's parser: its delta object and finish_reason."""
    delta = parser.push(out.new_text)
    if not out.finished:
        return delta.openai(), None
    delta.extend(parser.finish())
    reason = _finish_reason(out.finish_reason, parser)
    _check_tool_choice(req, [c for c in parser.tools.calls if c.complete] if parser.tools else [], reason)
    return delta.openai(), reason


def _finish_reason(reason: str | None, parser: OutputParser) -> str | None:
    """"tool_calls" for an output that stopped after complete calls; a call cut by max_tokens stays "length"."""
    return "tool_calls" if reason == "stop" and parser.called_tools else reason


def _check_tool_choice(req: p.ChatCompletionRequest, calls: list[ToolCall], reason: str | None) -> None:
    """Log a finished output that breaks tool_choice "required" or a named function, which its grammar rules out
    unless a stop string or stop token cut the call; the output goes back as written."""
    if not forces_a_call(req.tool_choice) or reason not in ("stop", "tool_calls"):
        return
    problem = unmet_tool_choice(req.tool_choice, req.tools or [], calls)
    if problem is not None:
        logger.warning("tool_choice %s not met under its grammar (cut by a stop?): %s", choice_text(req.tool_choice),
                       problem)


def _error_event(job: _Job, e: Exception) -> bytes:
    """The event that ends a failed stream, then [DONE] (vLLM's order; OpenAI's clients raise on the first)."""
    job.error = job.error or str(e)
    code = "service_unavailable" if isinstance(e, Draining) else "server_error"
    return sse(p.error_body(str(e), "server_error", None, code)) + sse("[DONE]")
