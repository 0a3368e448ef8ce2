"""The `openseek` command: one subcommand per function, each registered by its own `add_*` function, one module
per command or group of commands (info, generate + chat, convert, serve, bench, train + plot; common: the flags
and helpers they share).

User-input problems (missing files, unknown presets, invalid configs) raise UsageError; `main` prints them as one
`error: ...` line on stderr and returns 2, the exit code argparse uses for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from .bench import BENCHMARKS, add_bench, cmd_bench
from .common import (BUNDLED_MODEL_NAME, LOCAL_ENGINE_FIELDS, SERVE_ENGINE_FIELDS, UsageError, add_model_args,
                     engine_config, load_engine)
from .convert import add_convert, cmd_convert
from .generate import add_chat, add_generate, add_sampling_args, cmd_chat, cmd_generate
from .info import add_info, cmd_info, load_config
from .serve import add_limit_args, add_parser_args, add_serve, cmd_serve
from .train import EngineSampler, add_plot, add_train, cmd_plot, cmd_train, engine_sampler

__all__ = ["BENCHMARKS", "BUNDLED_MODEL_NAME", "LOCAL_ENGINE_FIELDS", "SERVE_ENGINE_FIELDS", "EngineSampler",
           "UsageError", "add_bench", "add_chat", "add_convert", "add_generate", "add_info", "add_limit_args",
           "add_model_args", "add_parser_args", "add_plot", "add_sampling_args", "add_serve", "add_train",
           "build_parser", "cmd_bench", "cmd_chat", "cmd_convert", "cmd_generate", "cmd_info", "cmd_plot",
           "cmd_serve", "cmd_train", "engine_config", "engine_sampler", "load_config", "load_engine", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openseek", description="DeepSeek-V2/V3 (MLA + DeepSeekMoE) in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_info(sub)  # serve / train / ... register here the same way
    add_generate(sub)
    add_chat(sub)
    add_convert(sub)
    add_serve(sub)
    add_bench(sub)
    add_train(sub)
    add_plot(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `openseek info ... | head`: the reader left; stop quietly (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
