"""`LLM`: vLLM's offline API, a thin facade that loads a model folder and drives an `LLMEngine` to completion.

    llm = LLM(model=PATH, max_num_seqs=8)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque

from ..model import Transformer
from ..tokenizer import Tokenizer
from .config import EngineConfig
from .engine import LLMEngine, Prompt, QueueFull
from .output_processor import RequestOutput
from .sampler import SamplingParams


class LLM:
    """`LLM(PATH, max_num_seqs=8)`: keyword arguments are EngineConfig fields, laid over `config`; a loaded
    Transformer (quantised, sharded, a trainer's) is taken as it is, with its `tokenizer`."""

    def __init__(self, model: str | os.PathLike | Transformer, config: EngineConfig | None = None,
                 tokenizer: Tokenizer | None = None, **fields):
        config = dataclasses.replace(config or EngineConfig(), **fields)
        if isinstance(model, Transformer):
            self.llm_engine = LLMEngine(model, tokenizer, config)
        else:
            self.llm_engine = LLMEngine.from_pretrained(model, config)
        self._next_id = 0

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes, so the next requests compute their prompts in full (benchmarks)."""
        self.llm_engine.reset_prefix_cache()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; outputs in prompt order, each with params.n completions. sampling_params: one
        for all prompts, or a list with one per prompt (as vLLM).

        Prompts are queued as the engine's waiting queue allows; if one is rejected, the others are aborted. A
        request the engine failed (vLLM-like) comes back with finish_reason "error" and the reason in `error`; the
        others are unaffected.
        """
        engine = self.llm_engine
        single = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                      and isinstance(prompts[0], int))
        prompts = [prompts] if single else prompts
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params holds {len(sampling_params)} entries for {len(prompts)} prompts: "
                                 "give one, or one per prompt")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        todo = deque((f"gen-{self._next_id + k}", p, sp) for k, (p, sp) in enumerate(zip(prompts, params)))
        self._next_id += len(todo)
        ids, done = [rid for rid, _, _ in todo], {}
        try:
            while todo or engine.has_unfinished_requests():
                while todo and _try_add(engine, *todo[0]):
                    todo.popleft()
                done.update((out.request_id, out.output) for out in engine.step() if out.output is not None)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        return [done[rid] for rid in ids]


def _try_add(engine: LLMEngine, request_id: str, prompt: Prompt, params: SamplingParams) -> bool:
    try:
        engine.add_request(request_id, prompt, params)
    except QueueFull:
        return False
    return True
