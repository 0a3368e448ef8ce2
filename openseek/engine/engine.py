"""`LLM`: vLLM's offline API over the step interface the server drives.

    llm = LLM(model=PATH)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Underneath: `add_request` -> `step()` (one scheduled forward pass, returning per-request deltas) -> `abort`.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import load_pretrained
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .block_pool import BlockPool
from .runner import ModelRunner
from .sampler import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status

Prompt = str | dict[str, Any] | list[int]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    logprobs: list[dict[int, float]] | None = None  # per token: the sampled token and the top-N, id -> logprob


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass(slots=True)
class StepOutput:
    """What one step added to one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on the first delta, if asked; entry 0 is None


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator
    prompt: str | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted: int = 0  # characters of text already returned in deltas
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)


class LLM:
    def __init__(self, model: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str = "cpu",
                 max_num_seqs: int = 64, max_model_len: int | None = None, kv_cache_memory: int | None = None,
                 block_size: int = 16, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 seed: int = 0):
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: must be a positive integer")
        self.model = load_pretrained(model, dtype=dtype, device=device)
        self.tokenizer = Tokenizer.from_pretrained(model)
        cfg = self.model.config
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 8192)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.bytes_per_token = cfg.num_hidden_layers * cfg.kv_cache_dim * self.model.dtype.itemsize
        if kv_cache_memory is None:
            kv_cache_memory = min(1 << 30, max_num_seqs * self.max_model_len * self.bytes_per_token)
        num_blocks = kv_cache_memory // (block_size * self.bytes_per_token)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} holds {num_blocks * block_size} tokens, fewer than "
                             f"max_model_len={self.max_model_len} ({self.bytes_per_token} bytes per token)")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, block_size)
        self.requests: dict[str, _Request] = {}  # unfinished ones, and finished ones `generate` will collect
        self._collect_ids: set[str] = set()
        self._rng = random.Random(seed)
        self._next_id = 0

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes, so the next requests compute their prompts in full (benchmarks; vLLM's name)."""
        self.pool.reset_prefix_cache()

    @property
    def token_capacity(self) -> int:
        return self.pool.num_blocks * self.block_size

    # ---- the step interface ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        self._enqueue(self._prepare(request_id, prompt, params or SamplingParams()))

    def _prepare(self, request_id: str, prompt: Prompt, params: SamplingParams) -> _Request:
        """Validate and tokenize; no side effect, so a rejected request leaves the engine as it was."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, which must also "
                             "leave room for at least one generated token")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(params.seed if params.seed is not None else self._rng.getrandbits(63))
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) if self.tokenizer else None
        seq = Sequence(request_id, ids, max_tokens, params, needs_all_logits=params.prompt_logprobs is not None)
        req = _Request(seq, params, gen, text, detok)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(ids)
        return req

    def _enqueue(self, req: _Request) -> None:
        self.requests[req.seq.request_id] = req
        self.scheduler.add(req.seq)

    def abort(self, request_id: str) -> None:
        """Drop a request and free its cache blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and req.seq.status is not Status.FINISHED:
            self.scheduler.finish(req.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        run = self.runner.run(batch)
        for i, chunk in run.chunk_logits.items():
            self._record_prompt_logprobs(self.requests[batch.seqs[i].request_id], chunk)
        self.scheduler.after_step(batch)
        sampling = [self.requests[seq.request_id] for i, seq in enumerate(batch.seqs) if batch.samples[i]]
        if not sampling:
            return []
        eos = self.tokenizer.eos_token_id if self.tokenizer else _as_int(self.model.config.eos_token_id)
        result = sample(run.sample_logits, [r.params for r in sampling], [r.generator for r in sampling],
                        [r.seq.prompt_ids for r in sampling], [r.seq.output_ids for r in sampling], eos)
        outs = []
        for k, req in enumerate(sampling):
            lp = None
            if result.logprobs is not None and req.params.logprobs is not None:
                lp = {result.token_ids[k]: result.logprobs[k], **dict(result.top_logprobs[k])}
            outs.append(self._append(req, result.token_ids[k], lp, eos))
        return outs

    def _record_prompt_logprobs(self, req: _Request, chunk: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that this prefill chunk's positions predict (entry 0 stays None)."""
        seq, top_n = req.seq, req.params.prompt_logprobs
        start, prompt = seq.num_computed, seq.prompt_ids
        logp = chunk.log_softmax(-1)  # (n, V); row i predicts token start + i + 1
        top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
        for i in range(chunk.shape[0]):
            p = start + i + 1
            if p >= len(prompt) or req.prompt_logprobs[p] is not None:
                continue  # a generated position, or recomputed after preemption
            entry = {prompt[p]: logp[i, prompt[p]].item()}
            if top_n:
                entry.update(zip(top_ids[i].tolist(), top_vals[i].tolist()))
            req.prompt_logprobs[p] = entry

    def _append(self, req: _Request, token: int, lp: dict[int, float] | None, eos: int | None) -> StepOutput:
        seq, params = req.seq, req.params
        seq.output_ids.append(token)
        if lp is not None:
            req.logprobs.append(lp)
        if req.detok is not None:
            req.text += req.detok.push([token])
        reason = None
        if (token == eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif params.stop and (cut := _find_stop(req.text, params.stop, req.emitted)) is not None:
            req.text, reason = req.text[:cut], "stop"
        elif len(seq.output_ids) >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            if req.detok is not None and reason != "stop":
                req.text += req.detok.flush()  # a length stop may cut a multi-byte character
            self.scheduler.finish(seq, reason)
            if seq.request_id not in self._collect_ids:
                del self.requests[seq.request_id]
        # While running, hold back a possible stop-string prefix so a stream never shows it.
        hold = 0 if reason or not params.stop else max(map(len, params.stop)) - 1
        upto = max(req.emitted, len(req.text) - hold)
        new_text, req.emitted = req.text[req.emitted:upto], upto
        first = len(seq.output_ids) == 1
        return StepOutput(seq.request_id, [token], new_text, reason is not None, reason, [lp] if lp else None,
                          req.prompt_logprobs if first and req.params.prompt_logprobs is not None else None)

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

    # ---- the offline API -------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Generate for each prompt; outputs in prompt order, each with params.n completions."""
        params = sampling_params or SamplingParams()
        single = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                      and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        ids, reqs = [], []
        for prompt in prompts:  # validate everything before anything is queued
            rid = f"gen-{self._next_id}"
            self._next_id += 1
            ids.append(rid)
            for j in range(params.n):
                reqs.append(self._prepare(f"{rid}/{j}", prompt, params if params.n == 1 else _with_seed(params, j)))
        for req in reqs:
            self._collect_ids.add(req.seq.request_id)
            self._enqueue(req)
        while self.has_unfinished_requests():
            self.step()
        return [self._collect(rid, params.n) for rid in ids]

    def _collect(self, rid: str, n: int) -> RequestOutput:
        reqs = [self.requests.pop(f"{rid}/{j}") for j in range(n)]
        self._collect_ids.difference_update(f"{rid}/{j}" for j in range(n))
        outputs = [CompletionOutput(j, r.text, list(r.seq.output_ids), r.seq.finish_reason,
                                    r.logprobs if r.params.logprobs is not None else None)
                   for j, r in enumerate(reqs)]
        first = reqs[0]
        return RequestOutput(rid, first.prompt, first.seq.prompt_ids, outputs, True, first.seq.num_cached_prompt,
                             first.prompt_logprobs if first.params.prompt_logprobs is not None else None)


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in the not-yet-emitted tail of text (plus overlap), or None."""
    start = max(0, emitted - max(map(len, stops)))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _with_seed(params: SamplingParams, j: int) -> SamplingParams:
    return dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)


def _as_int(v: int | list[int] | None) -> int | None:
    return v[0] if isinstance(v, list) else v


def _parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "auto": None}
    if name not in table:
        raise ValueError(f"dtype={name!r} is invalid: allowed: {', '.join(table)}")
    return table[name]
