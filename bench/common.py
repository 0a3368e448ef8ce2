"""Shared pieces of the benchmarks: the bench checkpoint, a timer, markdown tables.

Every script under bench/ runs on the project's CPU machines (2 cores, 24 GiB) and builds the checkpoint it
needs itself, since nothing can be downloaded. Imports of transformers happen inside the functions that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(os.environ.get("OPENSEEK_BENCH_DIR", "/tmp/openseek-bench"))
BENCH_CHECKPOINT = BENCH_DIR / "v2-lite-scaled"

# DeepSeek-V2-Lite's shape scaled to these machines: same MLA dims, expert count, top-k and YaRN rope, with a
# narrower model, fewer layers and a smaller vocabulary (~640M parameters, ~2.6 GB in float32).
V2_LITE_SCALED: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=2816,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=64, moe_intermediate_size=352, num_experts_per_tok=6, n_shared_experts=2,
    topk_method="greedy", vocab_size=32000, max_position_embeddings=163840,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
)


def make_bench_checkpoint(path: str | os.PathLike = BENCH_CHECKPOINT, seed: int = 0,
                          shape: dict[str, Any] = V2_LITE_SCALED) -> int:
    """Write a random float32 checkpoint of this shape at path unless one is there; -> its parameter count."""
    path = Path(path)
    if _is_checkpoint(path):
        _check_shape(path, shape)
    elif path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not a checkpoint; pick another path or delete it")
    else:
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**shape, dtype=torch.float32)).float()
        # Written beside the target and renamed, so an interrupted run never leaves a half checkpoint behind.
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        del model
        tmp.rename(path)
        print(f"built bench checkpoint {path} (seed {seed}) in {time.perf_counter() - t0:.0f} s")
    n = checkpoint_params(path)
    print(f"bench checkpoint {path}: {n / 1e6:.1f}M parameters")
    return n


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _check_shape(path: Path, shape: dict[str, Any]) -> None:
    """Refuse to reuse a checkpoint that another recipe left at path (the seed is not recorded, only the shape)."""
    found = json.loads((path / "config.json").read_text())
    differ = [f"{k}={found.get(k)!r} (want {v!r})" for k, v in shape.items() if found.get(k) != v]
    if differ:
        raise ValueError(f"{path} holds a checkpoint of another shape: {', '.join(differ)}; delete it to rebuild")


def checkpoint_params(path: str | os.PathLike) -> int:
    """Total elements over a folder's *.safetensors files, from their headers alone (no tensor is read)."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))  # the format: 8-byte header length, then a JSON header
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                total += int(torch.Size(meta["shape"]).numel())
    return total


STATS = ("median", "min")


@dataclass(slots=True)
class Timing:
    runs_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def min_s(self) -> float:
        return min(self.runs_s)

    def stat_s(self, stat: str) -> float:
        """'median' or 'min' of the runs, in seconds."""
        if stat not in STATS:
            raise ValueError(f"stat {stat!r} is invalid: allowed: {', '.join(STATS)}")
        return self.median_s if stat == "median" else self.min_s


def time_it(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Call fn `warmup` times untimed, then `repeats` times, each timed with perf_counter (wall clock)."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several callables in turn within each repeat, so load from other processes falls on all alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: Timing(r) for name, r in runs.items()}


def random_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids (batch, seq) from their own generator, so every benchmark sees the same input for a seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x128,4x256' -> [(1, 128), (4, 256)]: (batch, sequence length) pairs."""
    shapes = []
    for item in text.split(","):
        try:
            b, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is invalid: expected BATCHxSEQ, e.g. 1x128") from None
        if b < 1 or s < 1:
            raise ValueError(f"shape {item!r} is invalid: batch and sequence length must be positive")
        shapes.append((b, s))
    return shapes


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, memory-mapped checkpoint pages included (ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A right-aligned markdown table; cells go through str(), so format numbers before passing them."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def machine_line() -> str:
    """One line naming what the numbers were measured on."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
            f"({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}), load average {load_average():.2f}")


def load_average() -> float:
    """The 1-minute load average: above the core count, other processes are taking time from the one measured."""
    return os.getloadavg()[0]


def kernel_bench_args(doc: str) -> argparse.Namespace:
    """--threads (set here) and --repeats, what the per-kernel benchmarks take; doc: the script's docstring."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args
