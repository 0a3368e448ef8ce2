"""`openseek info`: a model's architecture, parameter counts and KV-cache size, from its config alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PRESETS, ModelConfig, preset
from ..summary import CACHE_DTYPE_BYTES, DEFAULT_CACHE_DTYPE, format_info, summarize
from .common import UsageError


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
