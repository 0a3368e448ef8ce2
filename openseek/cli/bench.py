"""`openseek bench NAME`: run bench/NAME.py from the source checkout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError

BENCHMARKS = ("forward", "throughput", "capacity", "serve", "train_moe_vs_dense", "ablation")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (openseek against transformers, one run)",
                       description="Run bench/NAME.py from the source checkout; extra arguments go to the script.")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (see its --help)")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.name}.py"  # openseek/cli/ -> the checkout
    if not script.exists():
        raise UsageError(f"{script} not found: the benchmarks ship with the source checkout, not the wheel")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0
