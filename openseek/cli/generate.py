"""`openseek generate` (one prompt, streamed) and `openseek chat` (an interactive conversation)."""

from __future__ import annotations

import argparse

from .common import LOCAL_ENGINE_FIELDS, UsageError, add_model_args, load_engine


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float, top_p: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    add_model_args(p, LOCAL_ENGINE_FIELDS)
    add_sampling_args(p, max_tokens=128, temperature=0.0, top_p=1.0)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..chat import stream
    from ..engine import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, stop=args.stop)
        engine = load_engine(args, LOCAL_ENGINE_FIELDS, max_num_seqs=1)
        prompt = args.prompt
        if args.chat:
            if engine.tokenizer is None:
                raise ValueError("--chat needs a tokenizer.json in the model folder")
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt = {"prompt_token_ids": engine.tokenizer.encode(text, add_special_tokens=False)}
        pieces = stream(engine, "cli", prompt, params)
        first = next(pieces, "")  # the request is validated here
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    print(first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal, replies streamed",
                       description="An interactive chat through the model's chat template. /reset forgets the "
                                   "conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    add_model_args(p, LOCAL_ENGINE_FIELDS)
    add_sampling_args(p, max_tokens=512, temperature=0.6, top_p=0.95)  # DeepSeek's suggested chat sampling
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat import chat
    from ..engine import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens)
        return chat(load_engine(args, LOCAL_ENGINE_FIELDS, max_num_seqs=1), params, args.system)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
