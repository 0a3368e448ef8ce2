"""What a run reports: metrics.jsonl records (loss, balance losses, expert load, throughput and MFU)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .moe_recipe import MoERecipe
from .step import StepResult


class MetricsLog:
    """One JSON record per line in OUT/metrics.jsonl; appends, so a resumed run continues the file. Disabled (on
    ranks other than 0) it writes nothing."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():  # drop records past the checkpoint we resume from (or all, on a fresh start)
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train_record(step: int, res: StepResult, lr: float, seconds: float, flops_per_token: float, peak_flops: float,
                 recipe: MoERecipe) -> dict[str, Any]:
    """The metrics.jsonl record of one optimizer step; MFU counts the activated parameters' FLOPs."""
    tokens_per_s = res.tokens / max(seconds, 1e-9)
    return {"kind": "train", "step": step, "loss": res.loss, "aux": res.aux, "grad_norm": res.grad_norm, "lr": lr,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak_flops if peak_flops else 0.0,
            "moe": [{"layer": int(name.split(".")[1]), "max_over_mean": s["load_max_over_mean"], "cv": s["load_cv"],
                     "dead": s["dead_experts"], "dropped": s["dropped_fraction"]}
                    for name, s in recipe.stats().items()]}


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of a large matmul on this device: the denominator of model FLOPs utilisation."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    sync()
    return 5 * 2 * n**3 / (time.perf_counter() - t)
