"""vLLM's /tokenize and /detokenize: the server's own tokenizer over HTTP, for clients that must count or build
prompts exactly as the server will (lm-evaluation-harness, context-window budgeting, RAG chunkers).

    POST /tokenize    {"prompt": "..."} or {"messages": [...]}  -> {"count", "max_model_len", "tokens"}
    POST /detokenize  {"tokens": [...]}                         -> {"prompt"}

Messages are rendered by the chat template with the generation prompt, as /v1/chat/completions renders them.
Text goes through the same character bound as a completion's prompt before it is tokenized, off the event loop.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from . import protocol as p


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[p.ChatMessage] | None = None
    add_special_tokens: bool = True  # for prompt: BOS as a completion's prompt gets it


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


async def tokenize(serving, req: TokenizeRequest) -> dict:
    """The token ids of req's prompt or rendered messages; APIError (400, 404) names what is wrong."""
    _check(serving, req)
    if (req.prompt is None) == (req.messages is None):
        raise p.APIError(400, "send exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        p.check_chars(len(req.prompt), serving.max_prompt_chars, "prompt")
        ids = await asyncio.to_thread(serving.tokenizer.encode, req.prompt, req.add_special_tokens)
    else:
        chat = p.ChatCompletionRequest(model=req.model, messages=req.messages)
        ids = await asyncio.to_thread(chat.prompt_ids, serving.tokenizer, serving.max_prompt_chars)
    return {"count": len(ids), "max_model_len": serving.engine.llm_engine.max_model_len, "tokens": ids}


async def detokenize(serving, req: DetokenizeRequest) -> dict:
    """The text of req's token ids, special tokens included (vLLM's /detokenize)."""
    _check(serving, req)
    vocab = serving.tokenizer.vocab_size
    if bad := [t for t in req.tokens if not 0 <= t < vocab]:
        raise p.APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": await asyncio.to_thread(serving.tokenizer.decode, req.tokens, False)}


def _check(serving, req: TokenizeRequest | DetokenizeRequest) -> None:
    p.check_unicode(req)
    serving.check_model(req.model)
    if serving.tokenizer is None:
        raise p.APIError(400, "this model folder has no tokenizer.json", None)
