"""The `openseek` command: one subcommand per function, each registered by its own `add_*` function.

User-input problems (missing files, unknown presets, invalid configs) raise UsageError; `main` prints them as one
`error: ...` line on stderr and returns 2, the exit code argparse uses for bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import PRESETS, ModelConfig, preset
from .summary import CACHE_DTYPE_BYTES, DEFAULT_CACHE_DTYPE, format_info, summarize


BUNDLED_MODEL_NAME = "openseek-demo"  # the model id `openseek serve` gives the bundled model
LOCAL_ENGINE_FIELDS = ("dtype", "device", "max_model_len", "quantization", "quantization_group_size",
                       "compile", "tensor_parallel_size", "enable_expert_parallel")  # one sequence
SERVE_ENGINE_FIELDS = ("dtype", "device", "max_model_len", "max_num_seqs", "kv_cache_memory", "block_size",
                       "max_num_batched_tokens", "enable_prefix_caching", "seed", "max_waiting", "quantization",
                       "quantization_group_size", "compile", "tensor_parallel_size", "data_parallel_size",
                       "enable_expert_parallel", "distributed_timeout")


class UsageError(Exception):
    """Bad command-line input: reported as one line, never as a traceback."""


def load_config(path: str | None, preset_name: str | None) -> ModelConfig:
    """The ModelConfig from PATH (a checkpoint folder or its config.json) or from a named preset; exactly one."""
    if (path is None) == (preset_name is None):
        raise UsageError("give exactly one of PATH or --preset")
    if preset_name is not None:
        try:
            return preset(preset_name)
        except ValueError as e:
            raise UsageError(str(e)) from e
    if not Path(path).exists():
        raise UsageError(f"path {path} does not exist")
    try:
        return ModelConfig.from_file(path)
    except OSError as e:  # no config.json in the folder, unreadable file
        raise UsageError(str(e)) from e
    except (ValueError, TypeError) as e:  # bad JSON, invalid field; a TypeError from validation names no file
        raise UsageError(str(e) if str(path) in str(e) else f"invalid config in {path}: {e}") from e


# ---- info ------------------------------------------------------------------------------------------------------
def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts and KV-cache size of a model (no weights read)",
                       description="Summarise a model from its config.json or a preset; no weights are read.")
    p.add_argument("path", nargs="?", metavar="PATH", help="checkpoint folder (or its config.json)")
    p.add_argument("--preset", metavar="NAME", help=f"a shipped architecture: {', '.join(PRESETS)}")
    p.add_argument("--cache-dtype", choices=list(CACHE_DTYPE_BYTES), default=DEFAULT_CACHE_DTYPE,
                   help="element type for the KV-cache byte counts (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the same data as JSON")
    p.set_defaults(run=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.path, args.preset)
    data = {"source": {"preset": args.preset} if args.preset else {"path": str(args.path)},
            **summarize(cfg, args.cache_dtype)}
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


# ---- generate / chat ----------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """--model, and a flag per named EngineConfig field with default None, so EngineConfig's default applies."""
    from .engine import EngineConfig

    p.add_argument("--model", default=None, metavar="PATH", help="Hugging Face model folder (default: the bundled "
                                                                  "demo model, computed in float32)")
    defaults = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        if f.name not in names:
            continue
        default = getattr(defaults, f.name)
        text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        flag = f"--{f.name.replace('_', '-')}"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=int if f.type.startswith("int") else str, default=None, help=text)


def engine_config(args: argparse.Namespace, names: tuple[str, ...], **fixed):
    """The EngineConfig of the named engine flags given on the command line, with `fixed` fields on top."""
    from .engine import EngineConfig

    given = {name: v for name in names if (v := getattr(args, name)) is not None}
    return EngineConfig(**{**given, **fixed})


def load_engine(args: argparse.Namespace, names: tuple[str, ...], **fixed):
    """The LLMEngine of --model and the named flags; the bundled model (stored in bfloat16) computes in float32."""
    from . import BUNDLED_MODEL
    from .engine import LLMEngine

    model, dtype = args.model, args.dtype
    if model is None:
        if not (BUNDLED_MODEL / "config.json").exists():
            raise UsageError(f"the bundled model is missing from {BUNDLED_MODEL}: pass --model PATH")
        model, dtype = str(BUNDLED_MODEL), dtype or "float32"
    elif not Path(model).is_dir():
        raise UsageError(f"model path {model} is not a directory")
    try:
        return LLMEngine.from_pretrained(model, engine_config(args, names, **fixed, dtype=dtype))
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e


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
    from .chat import stream
    from .engine import SamplingParams

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
    from .chat import chat
    from .engine import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens)
        return chat(load_engine(args, LOCAL_ENGINE_FIELDS, max_num_seqs=1), params, args.system)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e


# ---- convert ---------------------------------------------------------------------------------------------------
def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint in another dtype (fp8 blocks dequantised) or quantised "
                                       "(int8, int4), tokenizer files copied",
                       description="Load SRC (any layout load_pretrained reads; MTP layers are not carried over) and "
                                   "write it to DST in the hub layout at --dtype; with --quantize, in "
                                   "compressed-tensors' int8 / int4 layout, which openseek and vLLM load.")
    p.add_argument("src", metavar="SRC", help="checkpoint folder")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantisation of every matmul weight but the router's (and lm_head's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: input columns per scale (default: 128, or the largest smaller size dividing every "
                        "weight's input dimension)")
    p.add_argument("--quantize-head", action="store_true", help="quantise lm_head too")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from .model import load_pretrained, save_pretrained
    from .tokenizer import TOKENIZER_FILES

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UsageError(f"model path {src} is not a directory")
    if dst.resolve() == src.resolve():
        raise UsageError("DST must differ from SRC: the weights are read while DST is written")
    try:
        model = load_pretrained(src, dtype=getattr(torch, args.dtype), quantization=args.quantize,
                                group_size=args.group_size, quantize_head=args.quantize_head)
        save_pretrained(model, dst)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    print(f"wrote {dst} ({args.dtype}{', ' + args.quantize if args.quantize else ''})")
    return 0


# ---- bench -----------------------------------------------------------------------------------------------------
BENCHMARKS = ("forward", "throughput", "capacity", "serve", "train_moe_vs_dense", "ablation")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (openseek against transformers, one run)",
                       description="Run bench/NAME.py from the source checkout; extra arguments go to the script.")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (see its --help)")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.exists():
        raise UsageError(f"{script} not found: the benchmarks ship with the source checkout, not the wheel")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ---- serve -----------------------------------------------------------------------------------------------------
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
    from .server.parsers import REASONING_PARSERS, TOOL_PARSERS

    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split the text up to </think> into message.reasoning_content (default: none)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="turn the model's tool-call tokens into OpenAI tool_calls; needed for requests with tools "
                        "(default: none)")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    from .server.limits import HTTPLimits

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

    from .server.app import build_app, serve
    from .server.async_engine import AsyncEngine
    from .server.limits import HTTPLimits
    from .server.protocol import Pricing

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


# ---- train / plot ----------------------------------------------------------------------------------------------
def add_train(sub: argparse._SubParsersAction) -> None:
    import dataclasses

    from .train.config import TRAIN_PRESETS, TrainConfig

    # allow_abbrev=False: with flags derived from fields, a prefix (--init of --init-std) must not silently match
    p = sub.add_parser("train", help="pre-train, fine-tune (--sft) or RL-train (--grpo) an MLA + DeepSeekMoE model, "
                                     "DeepSeek-V2 recipe",
                       description="Every TrainConfig field is a flag; unset flags keep the preset's value.",
                       allow_abbrev=False)
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(TRAIN_PRESETS)} (default: tiny)")
    p.add_argument("--config", metavar="FILE", help="a TrainConfig JSON file (instead of --preset)")
    p.add_argument("--out", default="out", help="output folder: metrics.jsonl, checkpoints/, model/")
    p.add_argument("--stop-at", type=int, default=None, metavar="K", help="stop cleanly after step K")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(TrainConfig):  # flags derived from the fields: defaults live in one place
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).removesuffix(" | None"))
        if f.name == "data":
            p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="text files or folders")
        elif f.type in (bool, "bool"):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true", default=None)
        elif kind is not None:
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train.config import TrainConfig, train_preset
    from .train.run import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    try:
        if args.config:
            base = TrainConfig.from_file(args.config).to_dict()
            cfg = TrainConfig(**{**base, **overrides})
        else:
            cfg = train_preset(args.preset, **overrides)
        path = train(cfg, args.out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress,
                     sampler_factory=engine_sampler)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    print(f"exported {path}" if path else f"stopped; continue with --resume --out {args.out}")
    return 0


class EngineSampler:
    """GRPO's rollout sampler (train/rollout.py's protocol): openseek.LLM over the trainer's own Transformer, so the
    rollouts read the very tensors the optimizer updates; cli.py builds it, as train code does not import the
    engine."""

    def __init__(self, model, tokenizer, max_model_len: int, max_num_seqs: int):
        from .engine import LLM

        self.llm = LLM(model, tokenizer=tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_waiting=max(256, max_num_seqs))

    def sample(self, prompts: list[list[int]], seeds: list[int], n: int, temperature: float, max_tokens: int):
        from .engine import SamplingParams
        from .train.rollout import Completion

        params = [SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=max_tokens, logprobs=0)
                  for seed in seeds]
        self.llm.reset_prefix_cache()  # each call computes from the same state: resumed runs draw the same tokens
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [[Completion(c.token_ids, [lp[t] for lp, t in zip(c.logprobs or [], c.token_ids)], c.text)
                 for c in out.outputs] for out in outs]

    def renew_weights(self) -> None:
        self.llm.llm_engine.update_weights()  # MLA's absorbed W_UK / W_UV, and the prefix cache


def engine_sampler(model, tokenizer, max_model_len: int, max_num_seqs: int) -> EngineSampler:
    return EngineSampler(model, tokenizer, max_model_len, max_num_seqs)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="loss curves and the expert-load heat map of a training run (PNG)")
    p.add_argument("out", help="the --out folder of `openseek train`")
    p.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot

    try:
        for path in plot(args.out):
            print(path)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    return 0


# ---- entry point -----------------------------------------------------------------------------------------------
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
