"""What each rank of a tensor / data-parallel engine computes: its part of the model (model/parallel.py), a
latent cache (of every sequence, or with data-parallel groups of its group's), and the same forward as every other
rank, in lockstep, joined by all-reduces on a process group of its own (gloo on CPU, NCCL on CUDA; not the default
group, so a caller's own torch.distributed stays untouched). Rank 0's ParallelRunner hands each step's inputs to
the other ranks (workers.py) before running its own part; only rank 0 computes logits.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..model import Transformer, load_pretrained
from ..model.parallel import Layout, Reduce, hidden_states_dp
from .config import EngineConfig
from .data_parallel import DataParallelBatch
from .runner import ModelRunner, RunOutput, StepInputs
from .scheduler import ScheduledBatch

if TYPE_CHECKING:
    from .workers import Workers


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: cuda:(index + r) for a CUDA device, the device itself otherwise."""
    d = torch.device(device)
    return torch.device(d.type, (d.index or 0) + rank) if d.type == "cuda" else d


def process_group(store: dist.Store, rank: int, size: int, device: torch.device, timeout: int) -> dist.ProcessGroup:
    """A process group of its own over `store`: NCCL for CUDA devices, gloo otherwise."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout))


def all_reducer(group: dist.ProcessGroup, timer: list[float]) -> Reduce:
    """In-place sum over the group; the seconds spent accumulate in timer[0] (bench/parallel.py reads them)."""
    def reduce(t: torch.Tensor) -> None:
        start = time.perf_counter()
        group.allreduce([t]).wait()
        timer[0] += time.perf_counter() - start
    return reduce


def layout(config: EngineConfig, rank: int) -> Layout:
    return Layout(rank, config.world_size, config.enable_expert_parallel, config.data_parallel_size)


def load_rank(path: str | os.PathLike, config: EngineConfig, rank: int, device: torch.device, reduce: Reduce
              ) -> Transformer:
    """Rank `rank`'s part of the model on `device`, reading only its slices of the checkpoint."""
    return load_pretrained(path, dtype=config.dtype, device=device,
                           quantization=config.quantization, group_size=config.quantization_group_size,
                           layout=layout(config, rank), reduce=reduce)


def weight_bytes(model: Transformer) -> dict[str, int]:
    """Resident parameter bytes: all, and the routed experts'."""
    out = {"weights": 0, "routed_experts": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        n = t.numel() * t.element_size()
        out["weights"] += n
        out["routed_experts"] += n if ".experts." in name else 0
    return out


class ParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: each step's inputs go to the workers first, then all ranks run the forward."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, workers: Workers):
        super().__init__(model, num_blocks, block_size)
        self.workers = workers
        workers.send(("cache", (num_blocks, block_size)))
        for rank in range(1, workers.size):
            workers.expect(rank, "ready")

    @property
    def healthy(self) -> bool:
        return self.workers.healthy

    def hidden_states(self, step: StepInputs) -> torch.Tensor:
        self.workers.send(("step", step))
        try:
            return super().hidden_states(step)
        except Exception as e:
            raise self.workers.diagnose(e) from e

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunOutput:
        """With data-parallel groups, each group's part of the batch goes to its ranks, all tokens to every rank."""
        if not isinstance(batch, DataParallelBatch):
            return super().run(batch)
        ids, steps, rows, last, spans, first_seq = [], [], [], [], [], 0
        for part in batch.parts:
            step = None
            if part.seqs:
                step, part_last, part_spans = self.prepare(part)
                last += [len(ids) + k for k in part_last]
                spans += [(first_seq + i, len(ids) + a, len(ids) + b) for i, a, b in part_spans]
            rows.append((len(ids), len(ids) + len(step.ids) if step else len(ids)))
            ids += step.ids if step else []
            steps.append(step)
            first_seq += len(part.seqs)
        T = self.workers.tp
        self.workers.send([("dp_step", (ids, steps[r // T], rows[r // T])) for r in range(1, len(steps) * T)])
        try:
            h = dp_forward(self, ids, steps[0], rows[0], self.workers.reduce)
        except Exception as e:
            raise self.workers.diagnose(e) from e
        return self.logits(h, last, spans)

    def worker_stats(self) -> list[dict[str, int]]:
        """Per rank, 0 first: resident weight bytes (all, routed experts') and cache bytes."""
        self.workers.send(("stats", None))
        return [{**weight_bytes(self.model), "cache": self.cache_bytes}] + \
            [self.workers.expect(r, "stats") for r in range(1, self.workers.size)]


@torch.inference_mode()
def dp_forward(runner: ModelRunner, ids: list[int], step: StepInputs | None, rows: tuple[int, int],
               reduce: Reduce) -> torch.Tensor:
    """One rank's forward under data-parallel attention: all tokens, its group's sequences' attention. -> (N, D)"""
    dev = runner.kv_cache[0].device
    batch = runner.forward_batch(step) if step is not None else None
    return hidden_states_dp(runner.model, torch.tensor(ids, dtype=torch.long, device=dev), batch, rows,
                            runner.kv_cache, reduce)
