"""What several commands share: UsageError, the engine-flag sets, and the helpers that turn flags into an engine."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


BUNDLED_MODEL_NAME = "openseek-demo"  # the model id `openseek serve` gives the bundled model
LOCAL_ENGINE_FIELDS = ("dtype", "device", "max_model_len", "quantization", "quantization_group_size",
                       "compile", "tensor_parallel_size", "enable_expert_parallel")  # one sequence
SERVE_ENGINE_FIELDS = ("dtype", "device", "max_model_len", "max_num_seqs", "kv_cache_memory", "block_size",
                       "max_num_batched_tokens", "enable_prefix_caching", "seed", "max_waiting", "quantization",
                       "quantization_group_size", "compile", "tensor_parallel_size", "data_parallel_size",
                       "enable_expert_parallel", "distributed_timeout")


class UsageError(Exception):
    """Bad command-line input: reported as one line, never as a traceback."""


def add_model_args(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """--model, and a flag per named EngineConfig field with default None, so EngineConfig's default applies."""
    from ..engine import EngineConfig

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
    from ..engine import EngineConfig

    given = {name: v for name in names if (v := getattr(args, name)) is not None}
    return EngineConfig(**{**given, **fixed})


def load_engine(args: argparse.Namespace, names: tuple[str, ...], **fixed):
    """The LLMEngine of --model and the named flags; the bundled model (stored in bfloat16) computes in float32."""
    from .. import BUNDLED_MODEL
    from ..engine import LLMEngine

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
