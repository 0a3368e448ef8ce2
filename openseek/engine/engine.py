"""`LLMEngine`: the step engine over an already-loaded model, the one owner of every request rule.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=8))
    engine.add_request("a", "Hello", SamplingParams(n=2, max_tokens=32))
    while engine.has_unfinished_requests():
        for delta in engine.step(): ...   # StepOutput; the last one of a request carries its RequestOutput

A request fans out into `n` sequences here (completion j draws with seed + j), admission is bounded here
(`max_waiting`), and `stats()` is what a server reports; the server adds nothing of its own. Under
`structured_outputs` each sequence gets its own grammar matcher (structured.py): its mask goes to the sampler
before every draw, the drawn token advances it, and a complete grammar ends the sequence with "stop".

A failure stays with the requests it concerns: they finish with finish_reason "error" and the reason in `error`
(their blocks freed), the rest of the batch goes on, and `step` raises for no single request.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..model import Transformer, load_pretrained
from ..tokenizer import Tokenizer
from ..validation import FieldError
from .block_pool import BlockPool
from .config import EngineConfig
from .data_parallel import data_parallel_scheduler
from .output_processor import Logprobs, RequestState, StepOutput
from .parallel import ParallelRunner, load_rank
from .runner import ModelRunner
from .sampler import SamplingParams, TokenMasks, sample
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, Status
from .structured import GrammarCompiler, StructuredOutputsParams, advance, token_masks
from .workers import Workers, launched_rank, serve_as_worker
from .workers import start as start_workers

logger = logging.getLogger(__name__)

Prompt = str | dict[str, Any] | list[int]  # text, {"prompt_token_ids": [...]}, or token ids
NO_FINITE_LOGIT = "sampling failed: the model gave no finite logit for this sequence (NaN or -inf everywhere)"


class QueueFull(Exception):
    """The waiting queue holds max_waiting sequences: the client should retry later."""


@dataclass(slots=True, frozen=True)
class EngineStats:
    waiting: int  # sequences
    running: int
    cache_usage: float  # fraction of cache blocks held by sequences
    generation_tokens: int  # since start, aborted requests' included


@dataclass(slots=True)
class _Pick:
    token: int
    logprobs: Logprobs | None
    error: str | None = None  # set when this row could not be sampled; token is then meaningless


@dataclass(slots=True)
class _Request:
    state: RequestState
    generators: list[torch.Generator]  # one per sequence
    matchers: list[Any] | None = None  # one grammar matcher per sequence, under structured_outputs


class LLMEngine:
    """Steps over `model` as given (its dtype and device; config.dtype and config.device only guide loading)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 workers: Workers | None = None):
        """`workers`: the other ranks of a tensor-parallel model, `model` being rank 0's part (from_pretrained)."""
        self.config = config = config or EngineConfig()
        if config.world_size > 1 and workers is None:
            raise FieldError("tensor_parallel_size", config.tensor_parallel_size, "needs a model folder, not a "
                             "loaded Transformer: each process loads its own part", "config field ")
        self.model, self.tokenizer = model, tokenizer
        mcfg = model.config
        self.max_model_len = config.model_len(mcfg.max_position_embeddings)
        if self.max_model_len < 2:  # else a dead engine: no prompt fits, and 0 would mean a cache of 0 blocks
            source = "" if config.max_model_len else f" (from max_position_embeddings={mcfg.max_position_embeddings})"
            raise FieldError("max_model_len", self.max_model_len, f"must be at least 2{source}: a prompt token and "
                             "a generated one", "config field ")
        if self.max_model_len > mcfg.max_position_embeddings:
            raise FieldError("max_model_len", self.max_model_len, f"must not exceed the model's "
                             f"max_position_embeddings ({mcfg.max_position_embeddings})", "config field ")
        bytes_per_token = mcfg.num_hidden_layers * mcfg.kv_cache_dim * model.dtype.itemsize
        kv_cache_memory = config.cache_memory(self.max_model_len, bytes_per_token)
        num_blocks = kv_cache_memory // (config.block_size * bytes_per_token)
        if num_blocks * config.block_size < self.max_model_len:
            raise FieldError("kv_cache_memory", kv_cache_memory, f"holds {num_blocks * config.block_size} tokens "
                             f"({bytes_per_token} bytes each): must hold max_model_len={self.max_model_len}",
                             "config field ")
        try:
            self.runner = ModelRunner(model, num_blocks, config.block_size, config.compile) if workers is None \
                else ParallelRunner(model, num_blocks, config.block_size, workers)
        except (RuntimeError, OverflowError, MemoryError, TypeError) as e:  # torch refuses a cache this size
            raise FieldError("kv_cache_memory", kv_cache_memory, f"could not be allocated on {model.device} "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})", "config field ") from None
        if config.data_parallel_size > 1:  # each group caches its own sequences: num_blocks each
            self.pool, self.scheduler = data_parallel_scheduler(
                config.data_parallel_size, num_blocks, config.enable_prefix_caching, config.block_size,
                config.max_num_seqs, config.max_num_batched_tokens)
        else:
            self.pool = BlockPool(num_blocks, config.enable_prefix_caching)
            self.scheduler = Scheduler(self.pool, config.block_size, config.max_num_seqs,
                                       config.max_num_batched_tokens)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer else _as_int(mcfg.eos_token_id)
        self.requests: dict[str, _Request] = {}  # unfinished ones
        self._rng = random.Random(config.seed)
        self._generation_tokens = 0
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: EngineConfig | None = None) -> LLMEngine:
        """Load a model folder (weights at config.dtype on config.device, quantised as config.quantization says,
        tokenizer.json if any) into an engine. With more than one rank, this process is rank 0 and starts the
        others (workers.py); under torchrun, on any other rank it serves rank 0 as a worker and then exits."""
        config = config or EngineConfig()
        if config.world_size > 1:
            if launched_rank(config):  # torchrun started this process as a rank other than 0: serve rank 0
                serve_as_worker(path, config)
                raise SystemExit(0)
            workers = start_workers(path, config)  # they load their parts while this process loads rank 0's
            try:
                return cls(load_rank(path, config, 0, workers.device, workers.reduce), Tokenizer.from_pretrained(path),
                           config, workers)
            except BaseException:
                workers.close()
                raise
        model = load_pretrained(path, dtype=config.dtype, device=config.device, quantization=config.quantization,
                                group_size=config.quantization_group_size)
        return cls(model, Tokenizer.from_pretrained(path), config)

    @property
    def healthy(self) -> bool:
        """False once the model can no longer run (a tensor-parallel worker was lost); requests then fail."""
        return self.runner.healthy

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (also done when the engine is collected)."""
        if isinstance(self.runner, ParallelRunner):
            self.runner.workers.close()

    @property
    def token_capacity(self) -> int:
        return self.pool.num_blocks * self.config.block_size

    def update_weights(self) -> None:
        """Renew what derives from the model's weights after a trainer changed them in place (no request running)."""
        self.model.absorb_weights()  # MLA's W_UK and W_UV^T are copies of wkv_b
        self.reset_prefix_cache()  # cached latents were computed with the old weights

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes, so the next requests compute their prompts in full (vLLM's name)."""
        self.pool.reset_prefix_cache()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.waiting), len(s.running), self.pool.usage(), self._generation_tokens)

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request of params.n sequences; raises ValueError (a bad request) or QueueFull."""
        self.add_requests([(request_id, prompt, params or SamplingParams())])

    def add_requests(self, requests: list[tuple[str, Prompt, SamplingParams]]) -> None:
        """Queue several requests, all or none: a rejected one leaves the engine as it was."""
        limit, total = self.config.max_waiting, sum(params.n for _, _, params in requests)
        if total > limit:
            n = max(params.n for _, _, params in requests)
            raise FieldError("n", n, f"at most {limit} sequences (max_waiting) can be queued; this asks for {total} "
                             "(prompts x n)")
        prepared = [self._prepare(*r) for r in requests]
        if len({r.state.request_id for r in prepared}) < len(prepared):
            raise ValueError("request ids must be distinct")
        waiting = len(self.scheduler.waiting)
        if waiting + total > limit:
            raise QueueFull(f"the waiting queue is full ({waiting} of {limit} sequences); retry later")
        for req in prepared:
            self.requests[req.state.request_id] = req
            for seq in req.state.seqs:
                self.scheduler.add(seq)

    def _prepare(self, request_id: str, prompt: Prompt, params: SamplingParams) -> _Request:
        """Validate and tokenize; no side effect."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, which must also "
                             "leave room for at least one generated token")
        vocab = self.model.config.vocab_size
        if params.logit_bias and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise FieldError("logit_bias", bad[:5], f"token ids must be in the vocabulary [0, {vocab})")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs, generators = [], []
        for j in range(params.n):
            seqs.append(Sequence(request_id, ids, max_tokens, j, needs_all_logits=params.prompt_logprobs is not None))
            generators.append(torch.Generator(device=self.model.device))
            generators[-1].manual_seed(self._rng.getrandbits(63) if params.seed is None else params.seed + j)
        matchers = None
        if params.structured_outputs is not None:  # each completion follows the grammar on its own
            matchers = [self.compile_grammar(params.structured_outputs) for _ in seqs]
        return _Request(RequestState(request_id, text, params, seqs, self.tokenizer), generators, matchers)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt needs the key 'prompt_token_ids'")
            prompt = list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer.json: pass {'prompt_token_ids': [...]}")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, prompt
        else:
            raise ValueError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, not {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return text, ids

    def compile_grammar(self, structured: StructuredOutputsParams) -> Any:
        """A fresh matcher for `structured`, compiled once and then cached by its text; FieldError naming why it
        cannot compile. Thread-safe: a server compiles off its event loop, so add_request finds it cached."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise FieldError("structured_outputs", structured.kind, "needs the model's tokenizer.json")
                self._grammars = GrammarCompiler(self.tokenizer.to_str(), self.model.config.vocab_size,
                                                 self.eos_token_id)
        return self._grammars.compile(structured)

    def abort(self, request_id: str) -> None:
        """Drop a request and free its sequences' cache blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        for seq in req.state.seqs if req else []:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduled forward pass; a delta per sequence that sampled a token, and the last deltas of failed
        requests (a failed forward pass fails every request in its batch)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        try:
            run = self.runner.run(batch)
            failed = self._record_prompt_logprobs(batch, run.chunk_logits)
            self.scheduler.after_step(batch)
        except Exception as e:
            logger.exception("a step over %d sequences failed; failing their requests", len(batch.seqs))
            return self._fail(dict.fromkeys([seq.request_id for seq in batch.seqs], _why("forward pass", e)))
        sampled = [seq for i, seq in enumerate(batch.seqs) if batch.samples[i]]  # one per row of sample_logits
        keep = [k for k, seq in enumerate(sampled) if seq.request_id not in failed]
        if not keep:
            return self._fail(failed)
        seqs = [sampled[k] for k in keep]
        logits = run.sample_logits if len(keep) == len(sampled) else run.sample_logits[keep]  # (B, V)
        picks = self._sample(logits, seqs)
        self._generation_tokens += len(seqs)
        outs = []
        for seq, pick in zip(seqs, picks):
            if seq.request_id in failed:
                continue  # another completion of this request failed earlier in this loop
            if pick.error is not None:
                failed[seq.request_id] = pick.error
                continue
            try:
                outs.append(self._emit(seq, pick))
            except Exception as e:
                logger.exception("processing the output of request %r failed", seq.request_id)
                failed[seq.request_id] = _why("output processing", e)
        return outs + self._fail(failed)

    def _record_prompt_logprobs(self, batch: ScheduledBatch, chunk_logits: dict) -> dict[str, str]:
        """Prompt logprobs of this step's prefill chunks; the requests whose recording failed, with why."""
        failed = {}
        for i, chunk in chunk_logits.items():
            seq = batch.seqs[i]
            try:
                self.requests[seq.request_id].state.record_prompt_logprobs(seq.num_computed, chunk)
            except Exception as e:
                logger.exception("prompt logprobs of request %r failed", seq.request_id)
                failed[seq.request_id] = _why("prompt logprobs", e)
        return failed

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[_Pick]:
        """One pick per row of logits (B, V). A batch that raises is sampled again row by row, so the failure stays
        with the row that caused it (a retried row draws a fresh uniform: same distribution, not the same draw)."""
        try:
            return self._picks(logits, seqs)
        except Exception:
            logger.exception("sampling %d rows failed; sampling each row alone", len(seqs))
        picks = []
        for k, seq in enumerate(seqs):
            try:
                picks += self._picks(logits[k:k + 1], [seq])
            except Exception as e:
                logger.exception("sampling request %r failed", seq.request_id)
                picks.append(_Pick(0, None, _why("sampling", e)))
        return picks

    def _picks(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[_Pick]:
        reqs = [self.requests[seq.request_id] for seq in seqs]
        params = [r.state.params for r in reqs]
        matchers = [r.matchers[s.index] if r.matchers else None for r, s in zip(reqs, seqs)]
        rows = [k for k, m in enumerate(matchers) if m is not None]
        masks = TokenMasks(rows, token_masks([matchers[k] for k in rows], logits.shape[1])) if rows else None
        result = sample(logits, params, [r.generators[s.index] for r, s in zip(reqs, seqs)],
                        [s.prompt_ids for s in seqs], [s.output_ids for s in seqs], self.eos_token_id, masks)
        picks = []
        for k, p in enumerate(params):
            lp = None
            if result.logprobs is not None and p.logprobs is not None:
                lp = {result.token_ids[k]: result.logprobs[k], **dict(result.top_logprobs[k])}
            picks.append(_Pick(result.token_ids[k], lp))
        for k in result.failed:
            logger.error("request %r: %s", seqs[k].request_id, NO_FINITE_LOGIT)
            picks[k].error = NO_FINITE_LOGIT
        return picks

    def _emit(self, seq: Sequence, pick: _Pick) -> StepOutput:
        """Append a sampled token to its sequence and request: the delta, finishing what it ends."""
        req = self.requests[seq.request_id]
        seq.output_ids.append(pick.token)
        ended = req.matchers is not None and advance(req.matchers[seq.index], pick.token)
        out = req.state.append(seq.index, pick.token, pick.logprobs, self.eos_token_id, ended)
        if out.finished:
            self.scheduler.finish(seq, out.finish_reason)
        if out.output is not None:
            del self.requests[seq.request_id]
        return out

    def _fail(self, errors: dict[str, str]) -> list[StepOutput]:
        """Finish every sequence of each failed request with "error", freeing its blocks: their last deltas."""
        outs = []
        for request_id, error in errors.items():
            req = self.requests.pop(request_id, None)
            if req is None:
                continue  # it had already ended in this step
            for seq in req.state.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq, "error")
            outs += req.state.fail(error)
        return outs


def _why(what: str, e: Exception) -> str:
    """The error a failed request reports: which part failed, and the exception."""
    return f"{what} failed: {type(e).__name__}: {e}"


def _as_int(v: int | list[int] | None) -> int | None:
    return v[0] if isinstance(v, list) else v
