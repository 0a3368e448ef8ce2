"""Output processing, as vLLM v1's output processor: sampled tokens to text, stop strings, logprobs, prompt logprobs.

One `RequestState` per request holds what its client gets back: per completion the text (detokenised
incrementally), the logprobs, and the finish reason. While a sequence
runs, a possible stop-string prefix is held back, so a stream never shows a stop string. The token ids are the
scheduler's `Sequence` records, read here and never copied.

Shapes: S tokens of one prefill chunk, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sampler import SamplingParams
from .sequence import Sequence

Logprobs = dict[int, float]  # the sampled (or prompt) token and the top-N, id -> logprob


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error", or None while running
    logprobs: list[Logprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprobs | None] | None = None  # entry 0 is None: nothing predicts the first token
    error: str | None = None  # why the engine failed this request (its completions end with "error")


@dataclass(slots=True)
class StepOutput:
    """What one step added to completion `index` of a request."""
    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool  # this completion
    finish_reason: str | None = None
    new_logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None  # on each completion's first delta, if asked
    output: RequestOutput | None = None  # the whole request, on the delta that finishes its last completion
    error: str | None = None  # set when finish_reason is "error": what failed, for this request's client only


@dataclass
class _Completion:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted: int = 0  # characters of text already returned in deltas
    logprobs: list[Logprobs] = field(default_factory=list)
    finish_reason: str | None = None


class RequestState:
    """The output side of one request and its n completions."""

    def __init__(self, request_id: str, prompt: str | None, params: SamplingParams, seqs: list[Sequence],
                 tokenizer: Tokenizer | None):
        self.request_id, self.prompt, self.params, self.seqs = request_id, prompt, params, seqs
        self.prompt_ids = seqs[0].prompt_ids
        self.completions = [
            _Completion(seq, IncrementalDetokenizer(tokenizer, seq.prompt_ids, params.skip_special_tokens)
                        if tokenizer else None) for seq in seqs]
        self.prompt_logprobs = None if params.prompt_logprobs is None else [None] * len(self.prompt_ids)
        self.unfinished = len(seqs)
        self.error: str | None = None  # why the engine failed this request

    def record_prompt_logprobs(self, start: int, chunk: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that a prefill chunk from position `start` predicts (entry 0 stays None)."""
        top_n, prompt = self.params.prompt_logprobs, self.prompt_ids
        logp = chunk.log_softmax(-1)  # (S, V); row i predicts token start + i + 1
        top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)  # (S, top_n)
        for i in range(chunk.shape[0]):
            p = start + i + 1
            if p >= len(prompt) or self.prompt_logprobs[p] is not None:
                continue  # a generated position, or computed already (another completion, or before preemption)
            entry = {prompt[p]: logp[i, prompt[p]].item()}
            if top_n:
                entry.update(zip(top_ids[i].tolist(), top_vals[i].tolist()))
            self.prompt_logprobs[p] = entry

    def append(self, index: int, token: int, lp: Logprobs | None, eos: int | None, ended: bool = False
               ) -> StepOutput:
        """Process the token the engine just appended to completion `index`: text, stop checks, the delta.
        `ended`: the completion's grammar is complete, so it stops whatever ignore_eos says."""
        c, params = self.completions[index], self.params
        if lp is not None:
            c.logprobs.append(lp)
        if c.detok is not None:
            c.text += c.detok.push([token])
        reason = None
        if (token == eos and not params.ignore_eos) or token in params.stop_token_ids or ended:
            reason = "stop"
        elif params.stop and (cut := _find_stop(c.text, params.stop, c.emitted)) is not None:
            c.text, reason = c.text[:cut], "stop"
        elif len(c.seq.output_ids) >= c.seq.max_tokens:
            reason = "length"
        if reason is not None:
            if c.detok is not None and reason != "stop":
                c.text += c.detok.flush()  # a length stop may cut a multi-byte character
            self.finish(index, reason)
        hold = 0 if reason or not params.stop else max(map(len, params.stop)) - 1
        upto = max(c.emitted, len(c.text) - hold)
        new_text, c.emitted = c.text[c.emitted:upto], upto
        first = len(c.seq.output_ids) == 1
        return StepOutput(self.request_id, index, [token], new_text, reason is not None, reason,
                          [lp] if lp else None, self.prompt_logprobs if first else None,
                          self.output() if reason is not None and self.unfinished == 0 else None)

    def finish(self, index: int, reason: str) -> None:
        c = self.completions[index]
        if c.finish_reason is None:
            c.finish_reason, self.unfinished = reason, self.unfinished - 1

    def fail(self, error: str) -> list[StepOutput]:
        """End every unfinished completion with "error": their last deltas, the final one carrying the output."""
        self.error = error
        open_ = [j for j, c in enumerate(self.completions) if c.finish_reason is None]
        for j in open_:
            self.finish(j, "error")
        # no completion left open (a failure after the last one finished): the output still has to reach the client
        outs = [StepOutput(self.request_id, j, [], "", True, "error", error=error)
                for j in open_ or [len(self.completions) - 1]]
        outs[-1].output = self.output()
        return outs

    def output(self) -> RequestOutput:
        """The request as it stands: every completion's full text, token ids and logprobs."""
        outs = [CompletionOutput(j, c.text, list(c.seq.output_ids), c.finish_reason,
                                 c.logprobs if self.params.logprobs is not None else None)
                for j, c in enumerate(self.completions)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.unfinished == 0,
                             self.seqs[0].num_cached_prompt, self.prompt_logprobs, self.error)


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in the not-yet-emitted tail of text (plus overlap), or None."""
    start = max(0, emitted - max(map(len, stops)))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
