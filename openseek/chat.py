"""`openseek chat`: an interactive terminal chat over the engine, streaming the reply token by token.

The conversation is re-rendered through the model's chat template every turn (prefix caching makes the shared
history free to recompute); the oldest turns are dropped when it no longer fits the context.
"""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

from .engine import LLMEngine, Prompt, SamplingParams

HELP = "commands: /reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply (at the prompt: quits)"


def stream(engine: LLMEngine, request_id: str, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
    """The text of one request as the engine produces it; closing the iterator early aborts the request."""
    engine.add_request(request_id, prompt, params)
    try:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.request_id == request_id:
                    yield delta.new_text if engine.tokenizer else "".join(f"{t} " for t in delta.new_token_ids)
    finally:
        if engine.has_unfinished_requests():
            engine.abort(request_id)


def conversation_ids(engine: LLMEngine, messages: list[dict], reserve: int) -> list[int]:
    """The rendered conversation with the generation prompt, oldest turns dropped (a system message kept) until
    reserve tokens of reply fit in max_model_len."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        text = engine.tokenizer.apply_chat_template(system + turns, add_generation_prompt=True)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
        if len(ids) + reserve <= engine.max_model_len or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # a user turn and its reply at a time


def chat(engine: LLMEngine, params: SamplingParams, system: str | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout) -> int:
    """Read user turns from stdin until EOF or /exit; stream each reply to stdout."""
    if engine.tokenizer is None or engine.tokenizer.chat_template is None:
        raise ValueError("chat needs a tokenizer.json and a chat_template in the model folder")
    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=stdout)
    messages = [{"role": "system", "content": system}] if system else []
    reserve = min(params.max_tokens or engine.max_model_len // 4, engine.max_model_len // 2)
    turn = 0
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # EOF
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line in ("/reset", "/clear"):
            messages = messages[:1] if system else []
            continue
        if not line or line.startswith("/"):
            if line:
                print(HELP, file=stdout)
            continue
        messages.append({"role": "user", "content": line})
        ids = conversation_ids(engine, messages, reserve)
        if len(ids) >= engine.max_model_len:
            print(f"[this message alone is {len(ids)} tokens; the context holds {engine.max_model_len}]", file=stdout)
            messages.pop()
            continue
        reply, pieces = [], stream(engine, f"chat-{turn}", {"prompt_token_ids": ids}, params)
        try:
            for piece in pieces:
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            pieces.close()  # aborts the request, freeing its cache blocks
            stdout.write(" [stopped]")
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
    if interactive:
        stdout.write("\n")
    return 0
