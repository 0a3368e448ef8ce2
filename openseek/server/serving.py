"""The two generation routes, transport-free: submit a request's sequences, then collect or stream their deltas.

One HTTP request becomes len(prompts) x n engine requests (choice index = prompt index * n + j, seed + j when a
seed is given). Everything a client can get wrong is raised as APIError before anything is streamed; once a
stream has started, an engine failure is sent as an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine.sampler import SamplingParams
from . import protocol as p
from .async_engine import AsyncEngine, Draining, EngineFailed, QueueFull
from .metrics import Metrics


@dataclass(slots=True)
class _Choice:
    index: int
    prompt_text: str | None
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    emitted_chars: int = 0  # text already streamed, for logprobs text_offset
    last_token: float | None = None  # perf_counter of the latest delta, for inter-token latency


@dataclass(slots=True)
class _Job:
    """One HTTP request's engine requests, keyed by request id."""
    id: str
    model: str
    created: int
    choices: dict[str, _Choice]
    deltas: asyncio.Queue
    num_prompt_tokens: int
    arrival: float  # perf_counter when the request came in, for time to first token
    unfinished: set[str]  # request ids not finished (nor aborted) yet
    first_token: bool = False


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics, pricing: p.Pricing | None = None):
        self.engine, self.model_name, self.metrics, self.pricing = engine, model_name, metrics, pricing
        self.tokenizer = engine.llm.tokenizer

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
    async def submit(self, kind: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, n: int,
                     prompt_param: str, arrival: float) -> _Job:
        """Queue every sequence of a request, or raise APIError (400 rejected prompt, 429 queue full, 503)."""
        job_id = p.new_id(kind)
        requests, choices = [], {}
        for i, (text, ids) in enumerate(prompts):
            for j in range(n):
                rid = f"{job_id}-{i * n + j}"
                seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                requests.append((rid, {"prompt_token_ids": ids}, seeded))
                choices[rid] = _Choice(i * n + j, text, ids)
        try:
            deltas = await self.engine.add(requests)
        except QueueFull as e:
            raise p.APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error") from e
        except Draining as e:
            raise p.APIError(503, str(e), None, "service_unavailable", "server_error") from e
        except EngineFailed as e:
            raise p.APIError(500, str(e), None, None, "server_error") from e
        except ValueError as e:  # the engine names the problem: too long, empty, ids outside the vocabulary
            raise p.APIError(400, str(e), prompt_param) from e
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        return _Job(job_id, self.model_name, p.now(), choices, deltas, num_prompt_tokens, arrival, set(choices))

    async def deltas(self, job: _Job) -> AsyncIterator[tuple[_Choice, object]]:
        """Each (choice, StepOutput) as it arrives, accumulated into the choice; aborts the rest when closed early."""
        try:
            while job.unfinished:
                out = await job.deltas.get()
                if isinstance(out, Exception):
                    raise out
                choice = job.choices[out.request_id]
                self._accumulate(job, choice, out)
                if out.finished:
                    job.unfinished.discard(out.request_id)
                yield choice, out
        finally:
            self.abort(job)

    def abort(self, job: _Job) -> None:
        """Abort the job's unfinished sequences (its client left); safe to call more than once."""
        self.engine.abort(sorted(job.unfinished))
        job.unfinished.clear()

    def _accumulate(self, job: _Job, choice: _Choice, out) -> None:
        t = time.perf_counter()
        if not job.first_token:
            job.first_token = True
            self.metrics.ttft.observe(t - job.arrival)
        if choice.last_token is not None:
            self.metrics.itl.observe(t - choice.last_token)
        choice.last_token = t
        choice.text += out.new_text
        choice.token_ids += out.new_token_ids
        choice.logprobs += out.new_logprobs or []
        if getattr(out, "prompt_logprobs", None) is not None:  # getattr: engines before prompt logprobs lack it
            choice.prompt_logprobs = out.prompt_logprobs
        choice.finish_reason = out.finish_reason

    async def collect(self, job: _Job) -> None:
        try:
            async with contextlib.aclosing(self.deltas(job)) as it:
                async for _ in it:
                    pass
        except Draining as e:
            raise p.APIError(503, str(e), None, "service_unavailable", "server_error") from e
        except EngineFailed as e:
            raise p.APIError(500, str(e), None, None, "server_error") from e

    def check_admissible(self, num_sequences: int) -> None:
        """Refuse early, before tokenizing: while draining, or more sequences than the waiting queue holds."""
        if self.engine.draining:
            raise p.APIError(503, "the server is shutting down", None, "service_unavailable", "server_error")
        if num_sequences > self.engine.max_waiting:
            raise p.APIError(400, f"the request asks for {num_sequences} sequences (prompts x n); this server "
                                  f"queues at most {self.engine.max_waiting}", "n")

    def usage(self, job: _Job, completion_tokens: int) -> dict:
        return p.usage(job.num_prompt_tokens, completion_tokens, self.pricing)

    # ---- /v1/completions ---------------------------------------------------------------------------------
    async def create_completion(self, req: p.CompletionRequest) -> _Job:
        arrival = time.perf_counter()
        self.check_model(req.model)
        params = req.to_params()
        self.check_admissible(req.num_prompts * req.n)
        return await self.submit("cmpl", req.prompts(self.tokenizer), params, req.n, "prompt", arrival)

    def _completion_piece(self, req: p.CompletionRequest, choice: _Choice, ids: list[int], entries: list,
                          text: str, first: bool) -> tuple[str, dict | None]:
        """Text and logprobs for a new piece of a choice; the first piece of an echo carries the prompt."""
        if req.max_tokens == 0:  # scoring only: the one generated token is not returned
            ids, entries, text = [], [], ""
        if req.echo and first:
            ids = choice.prompt_ids + ids
            entries = (choice.prompt_logprobs or [None] * len(choice.prompt_ids)) + entries
            text = self._prompt_text(choice) + text
        lp = None
        if req.logprobs is not None:
            lp = p.completion_logprobs(ids, entries, self.token_str, choice.emitted_chars)
        choice.emitted_chars += len(text)
        return text, lp

    def _prompt_text(self, choice: _Choice) -> str:
        if choice.prompt_text is not None:
            return choice.prompt_text
        return self.tokenizer.decode(choice.prompt_ids) if self.tokenizer else ""

    def completion_response(self, req: p.CompletionRequest, job: _Job) -> dict:
        choices, completion_tokens = [], 0
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            text, lp = self._completion_piece(req, c, c.token_ids, c.logprobs, c.text, first=True)
            reason = "length" if req.max_tokens == 0 else c.finish_reason
            completion_tokens += 0 if req.max_tokens == 0 else len(c.token_ids)
            choices.append(p.completion_choice(c.index, text, reason, lp))
        return p.response("text_completion", job.id, job.created, job.model, choices,
                          self.usage(job, completion_tokens))

    async def stream_completion(self, req: p.CompletionRequest, job: _Job) -> AsyncIterator[bytes]:
        completion_tokens = 0
        async with contextlib.aclosing(self.deltas(job)) as it:
            try:
                async for c, out in it:
                    first = len(c.token_ids) == len(out.new_token_ids)
                    ids, entries = out.new_token_ids, out.new_logprobs or []
                    text, lp = self._completion_piece(req, c, ids, entries, out.new_text, first)
                    reason = "length" if req.max_tokens == 0 else out.finish_reason
                    completion_tokens += 0 if req.max_tokens == 0 else len(ids)
                    choice = p.completion_choice(c.index, text, reason, lp)
                    yield sse(p.response("text_completion", job.id, job.created, job.model, [choice], None))
            except (EngineFailed, Draining) as e:
                yield sse(p.error_body(str(e), "server_error"))
        if req.include_usage:
            yield sse(p.response("text_completion", job.id, job.created, job.model, [],
                                 self.usage(job, completion_tokens)))
        yield sse("[DONE]")

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    async def create_chat(self, req: p.ChatCompletionRequest) -> _Job:
        arrival = time.perf_counter()
        self.check_model(req.model)
        params = req.to_params()
        self.check_admissible(req.n)
        ids = req.prompt_ids(self.tokenizer)
        return await self.submit("chatcmpl", [(None, ids)], params, req.n, "messages", arrival)

    def _chat_logprobs(self, req: p.ChatCompletionRequest, ids: list[int], entries: list) -> dict | None:
        if not req.logprobs:
            return None
        return p.chat_logprobs(ids, entries, req.top_logprobs or 0, self.token_str, self.token_bytes)

    def chat_response(self, req: p.ChatCompletionRequest, job: _Job) -> dict:
        choices = [p.chat_choice(c.index, c.text, c.finish_reason, self._chat_logprobs(req, c.token_ids, c.logprobs))
                   for c in sorted(job.choices.values(), key=lambda c: c.index)]
        completion_tokens = sum(len(c.token_ids) for c in job.choices.values())
        return p.response("chat.completion", job.id, job.created, job.model, choices,
                          self.usage(job, completion_tokens))

    async def stream_chat(self, req: p.ChatCompletionRequest, job: _Job) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            return sse(p.response("chat.completion.chunk", job.id, job.created, job.model, choices, usage))

        completion_tokens = 0
        async with contextlib.aclosing(self.deltas(job)) as it:
            for c in sorted(job.choices.values(), key=lambda c: c.index):
                yield chunk([p.chat_delta_choice(c.index, {"role": "assistant", "content": ""}, None, None)])
            try:
                async for c, out in it:
                    completion_tokens += len(out.new_token_ids)
                    lp = self._chat_logprobs(req, out.new_token_ids, out.new_logprobs or [])
                    delta = {"content": out.new_text} if out.new_text or not out.finished else {}
                    yield chunk([p.chat_delta_choice(c.index, delta, out.finish_reason, lp)])
            except (EngineFailed, Draining) as e:
                yield sse(p.error_body(str(e), "server_error"))
        if req.include_usage:
            yield chunk([], self.usage(job, completion_tokens))
        yield sse("[DONE]")
