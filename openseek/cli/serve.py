"""`openseek serve`: the OpenAI-compatible HTTP server over one engine."""

from __future__ import annotations

import argparse
import os

from .common import BUNDLED_MODEL_NAME, SERVE_ENGINE_FIELDS, UsageError, add_model_args, load_engine


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (completions, chat, models, metrics)",
                       description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics. SIGTERM drains in-flight requests, then exits.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(default: $OPENSEEK_API_KEY, else no key)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="the model id clients send "
                                                                            "(default: PATH as given, or "
                                                                            f"{BUNDLED_MODEL_NAME})")
    p.add_argument("--price-input", type=float, default=None, metavar="X", help="price per million prompt tokens; "
                                                                             "adds usage.cost")
    p.add_argument("--price-output", type=float, default=None, metavar="Y", help="price per million completion tokens")
    p.add_argument("--price-currency", default="USD", help="currency label of the prices (default: %(default)s)")
    add_parser_args(p)
    add_limit_args(p)
    add_model_args(p, SERVE_ENGINE_FIELDS)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=cmd_serve)


def add_parser_args(p: argparse.ArgumentParser) -> None:
    from ..server.parsers import REASONING_PARSERS, TOOL_PARSERS

    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split the text up to </think> into message.reasoning_content (default: none)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="turn the model's tool-call tokens into OpenAI tool_calls; needed for requests with tools "
                        "(default: none)")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    from ..server.limits import HTTPLimits

    d = HTTPLimits()
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                   help="larger request bodies get 413 before they are read (default: %(default)s, 16 MiB)")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout, metavar="SECONDS",
                   help="a client gets this long to send a request's headers (or is disconnected) and as long again "
                        "for its body (or gets 408) (default: %(default)s, as nginx)")
    p.add_argument("--timeout-keep-alive", type=int, default=d.timeout_keep_alive, metavar="SECONDS",
                   help="close idle keep-alive connections after this long (default: %(default)s, as uvicorn)")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency, metavar="N",
                   help="open connections beyond which requests get 503 (default: %(default)s)")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import torch

    from ..server.app import build_app, serve
    from ..server.async_engine import AsyncEngine
    from ..server.limits import HTTPLimits
    from ..server.protocol import Pricing

    if (args.price_input is None) != (args.price_output is None):
        raise UsageError("give both --price-input and --price-output, or neither")
    api_key = args.api_key or os.environ.get("OPENSEEK_API_KEY") or None
    pricing = None if args.price_input is None else Pricing(args.price_input, args.price_output, args.price_currency)
    try:
        limits = HTTPLimits(args.max_body_bytes, args.read_timeout, args.timeout_keep_alive, args.limit_concurrency)
    except ValueError as e:
        raise UsageError(str(e).replace("_", "-")) from e
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("openseek").warning("serving on %s without --api-key: anyone who can reach it can use it",
                                              args.host)
    # Only the engine's loop thread computes; an OpenMP team first created by the main thread (loading) slows the
    # loop thread's small kernels down, so load single-threaded.
    # Worker processes (tensor / data parallel) are started while loading and take this thread's count then.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if (args.tensor_parallel_size or 1) * (args.data_parallel_size or 1) > 1 else 1)
    engine = AsyncEngine(load_engine(args, SERVE_ENGINE_FIELDS), threads=threads)
    name = args.served_model_name or (args.model if args.model is not None else BUNDLED_MODEL_NAME)
    app = build_app(engine, name, api_key, pricing, args.public_metrics, limits, args.reasoning_parser,
                    args.tool_call_parser)
    return serve(app, args.host, args.port, args.log_level)
