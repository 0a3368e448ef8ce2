"""Serving over several processes on one machine: rank 0 (this process) keeps the scheduler, sampler and tokenizer
and computes too; ranks 1..W-1 are worker processes started here, each holding its part of the model (model/
parallel.py) and a latent cache (of every sequence, or with data-parallel groups of its group's), and running the
same forward in lockstep.

Every step rank 0 sends the step's inputs (plain lists, runner.StepInputs; with groups, the worker's group's part
and all token ids) down a pipe to each worker, then all W run the forward, joined by all-reduces on a process
group of their own (gloo on CPU, NCCL on CUDA; not the default group, so a caller's own torch.distributed stays
untouched). Only rank 0 computes logits.

A worker that dies or stalls is noticed by rank 0 as a failed collective (a closed socket at once, a stall after
`distributed_timeout` seconds) or by a liveness check before each step: the step's requests fail with an error
naming the worker, every later step fails at once, and `healthy` turns False (the server's /health reports it).
A worker whose parent dies reads end-of-file from its pipe and exits.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ModelConfig
from ..model import Transformer, load_pretrained
from ..model.parallel import Layout, Reduce, hidden_states_dp
from ..validation import FieldError
from .config import EngineConfig
from .data_parallel import DataParallelBatch
from .runner import ModelRunner, RunOutput, StepInputs
from .scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A worker process died, failed or stalled: the model can no longer run."""


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


def load_rank(path: str | os.PathLike, config: EngineConfig, rank: int, reduce: Reduce) -> Transformer:
    """Rank `rank`'s part of the model, reading only its slices of the checkpoint."""
    return load_pretrained(path, dtype=config.dtype, device=rank_device(config.device, rank),
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


class Workers:
    """Ranks 1..W-1: started, joined to rank 0's process group, and loaded by __init__."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig):
        W, self.timeout = config.world_size, config.distributed_timeout
        layout(config, 0).check(ModelConfig.from_file(Path(path)))  # before any process starts
        self.tp = config.tensor_parallel_size
        last = rank_device(config.device, W - 1)
        if last.type == "cuda" and last.index >= torch.cuda.device_count():
            raise FieldError("tensor_parallel_size", config.tensor_parallel_size, f"needs one CUDA device per rank, "
                             f"up to {last}; this machine has {torch.cuda.device_count()}", "config field ")
        store = dist.TCPStore("127.0.0.1", 0, W, is_master=True, timeout=timedelta(seconds=self.timeout),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.procs, self.conns, self.error = [], [], None
        for rank in range(1, W):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"openseek-rank{rank}", daemon=True,
                               args=(rank, store.port, str(path), config, torch.get_num_threads(), child))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        self.comm_seconds = [0.0]
        for r in range(1, W):
            self.expect(r, "hello")  # started and imported: the rendezvous below will not wait on a dead rank
        self.group = process_group(store, 0, W, rank_device(config.device, 0), self.timeout)
        self.store = store
        self.reduce = all_reducer(self.group, self.comm_seconds)

    def expect(self, rank: int, what: str) -> object:
        """Rank's next message, which must be `what`; WorkerLost if it reports an error or dies first."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise self.lost(self._why_dead(rank))
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise self.lost(self._why_dead(rank)) from None
        if kind != what:
            raise self.lost(f"worker rank {rank} failed: {payload}")
        return payload

    def _why_dead(self, rank: int) -> str:
        """A dead worker's last word (the error it sent before exiting), and its exit code."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        proc.join(timeout=1)
        why = f"worker rank {rank} exited with code {proc.exitcode}"
        try:
            while conn.poll(0):
                kind, payload = conn.recv()
                if kind == "error":
                    return f"{why} after failing: {payload}"
        except (EOFError, OSError):
            pass  # nothing more to read
        return why

    def send(self, message: tuple | list[tuple]) -> None:
        """The message to every worker, or message[r - 1] to rank r."""
        self.check()
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send(message[rank - 1] if isinstance(message, list) else message)
            except (BrokenPipeError, ConnectionError, EOFError, OSError):
                raise self.lost(f"worker rank {rank} is gone (exit code {self.procs[rank - 1].exitcode})") from None

    def check(self) -> None:
        """WorkerLost if a worker has ever been lost or is not running now."""
        if self.error is None:
            for rank, proc in enumerate(self.procs, 1):
                if not proc.is_alive():
                    self.lost(self._why_dead(rank))
                    break
        if self.error is not None:
            raise WorkerLost(self.error)

    def lost(self, why: str) -> WorkerLost:
        """Record the first reason the workers are unusable; -> the error to raise."""
        if self.error is None:
            self.error = f"tensor-parallel serving stopped: {why}; restart the engine"
            logger.error(self.error)
        return WorkerLost(self.error)

    def diagnose(self, e: Exception) -> WorkerLost:
        """After a failed step: which worker reported what, or died, else the failure itself."""
        for rank, proc in enumerate(self.procs, 1):
            proc.join(timeout=0.5)  # a worker whose step failed is exiting
            if not proc.is_alive():
                return self.lost(self._why_dead(rank))
        return self.lost(f"the step failed on rank 0 ({type(e).__name__}: {e}), so the ranks are out of step")

    def close(self) -> None:
        self._finalizer()


def _stop(procs: list, conns: list) -> None:
    """Tell every worker to exit, then make sure it has."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass  # already gone
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


class ParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: each step's inputs go to the workers first, then all ranks run the forward."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, workers: Workers):
        super().__init__(model, num_blocks, block_size)
        self.workers = workers
        workers.send(("cache", (num_blocks, block_size)))
        for rank in range(1, len(workers.procs) + 1):
            workers.expect(rank, "ready")

    @property
    def healthy(self) -> bool:
        try:
            self.workers.check()
        except WorkerLost:
            return False
        return True

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
            [self.workers.expect(r, "stats") for r in range(1, len(self.workers.procs) + 1)]


@torch.inference_mode()
def dp_forward(runner: ModelRunner, ids: list[int], step: StepInputs | None, rows: tuple[int, int],
               reduce: Reduce) -> torch.Tensor:
    """One rank's forward under data-parallel attention: all tokens, its group's sequences' attention. -> (N, D)"""
    dev = runner.kv_cache[0].device
    batch = runner.forward_batch(step) if step is not None else None
    return hidden_states_dp(runner.model, torch.tensor(ids, dtype=torch.long, device=dev), batch, rows,
                            runner.kv_cache, reduce)


def _worker_main(rank: int, port: int, path: str, config: EngineConfig, threads: int, conn) -> None:
    """A worker: join the group, load this rank's part, then run each step rank 0 sends until told to stop."""
    torch.set_num_threads(threads)
    try:
        conn.send(("hello", None))
        device = rank_device(config.device, rank)
        store = dist.TCPStore("127.0.0.1", port, config.world_size, is_master=False,
                              timeout=timedelta(seconds=config.distributed_timeout))
        group = process_group(store, rank, config.world_size, device, config.distributed_timeout)
        reduce = all_reducer(group, [0.0])
        model = load_rank(path, config, rank, reduce)
        runner = None
        while (message := conn.recv()) is not None:
            kind, payload = message
            if kind == "cache":
                runner = ModelRunner(model, *payload)
                conn.send(("ready", None))
            elif kind == "step":
                runner.hidden_states(payload)
            elif kind == "dp_step":
                dp_forward(runner, *payload, reduce)
            elif kind == "stats":
                conn.send(("stats", {**weight_bytes(model), "cache": runner.cache_bytes}))
    except EOFError:
        return  # rank 0 is gone
    except BaseException as e:
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        traceback.print_exc()
        os._exit(1)  # the group's sockets close with the process: rank 0's collective fails instead of waiting
