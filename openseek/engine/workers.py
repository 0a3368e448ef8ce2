"""The other ranks of a tensor / data-parallel engine (ranks 1..W-1) and rank 0's line to each of them.

Two ways to have them:
- spawned (the default): rank 0, the calling process, starts them on this machine (torch.multiprocessing, spawn;
  each takes the caller's torch thread count) and talks to each down a pipe; the rendezvous is a TCPStore on
  127.0.0.1. A worker whose parent dies reads end-of-file from its pipe and exits.
- launched by torchrun (`torchrun --nnodes N --nproc-per-node G -m openseek serve ... --tensor-parallel-size T`,
  WORLD_SIZE = T x data_parallel_size): every rank runs the same command; rank 0 becomes the engine, and building
  the engine on any other rank turns that process into a worker, which exits when rank 0 is done. Messages go
  through torchrun's store; rank r computes on cuda:LOCAL_RANK (CUDA) and torchrun ends the job if a rank dies.

Every step rank 0 sends each worker the step's inputs (runner.StepInputs: plain lists), then all ranks run the
forward (parallel.py). A worker that dies or stalls is noticed by rank 0 as a failed collective (a closed socket
at once, a stall after `distributed_timeout` seconds) or, when spawned, by a liveness check before each step: the
step's requests fail with an error naming the worker, every later step fails at once, and `healthy` turns False
(the server's engine loop stops and /health answers 503).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ModelConfig
from ..validation import FieldError
from .config import EngineConfig
from .parallel import all_reducer, dp_forward, layout, load_rank, process_group, rank_device, weight_bytes
from .runner import ModelRunner

logger = logging.getLogger(__name__)
OWN = "config field "


class WorkerLost(RuntimeError):
    """A worker process died, failed or stalled: the model can no longer run."""


class _Pipe:
    """Rank 0's line to a worker it spawned: the pipe, and the process for liveness."""

    def __init__(self, conn: Any, proc: mp.Process):
        self.conn, self.proc = conn, proc

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def poll(self, seconds: float) -> bool:
        return self.conn.poll(seconds)

    def recv(self) -> Any:
        return self.conn.recv()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def death(self) -> str:
        """How the worker ended: its exit code, and the error it sent last if any."""
        self.proc.join(timeout=1)
        why = f"exited with code {self.proc.exitcode}"
        try:
            while self.conn.poll(0):
                kind, payload = self.conn.recv()
                if kind == "error":
                    return f"{why} after failing: {payload}"
        except (EOFError, OSError):
            pass  # nothing more to read
        return why

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass  # already gone
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class _StoreLine:
    """A line between rank 0 and rank r through a key-value store: numbered keys, each read once and deleted."""

    def __init__(self, store: dist.Store, send_prefix: str, recv_prefix: str):
        self.store, self.send_prefix, self.recv_prefix = store, send_prefix, recv_prefix
        self.sent = self.received = 0

    def send(self, message: Any) -> None:
        self.store.set(f"{self.send_prefix}/{self.sent}", pickle.dumps(message))
        self.sent += 1

    def poll(self, seconds: float) -> bool:
        key = f"{self.recv_prefix}/{self.received}"
        deadline, pause = time.monotonic() + seconds, 0.0005
        while not self.store.check([key]):  # store.wait would do, but logs a warning at every timeout
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 0.05)  # prompt within a busy run of steps, few round trips when idle
        return True

    def recv(self) -> Any:
        while not self.poll(3600):
            pass  # an idle worker waits for as long as rank 0 does not stop it
        key = f"{self.recv_prefix}/{self.received}"
        data = self.store.get(key)
        self.store.delete_key(key)
        self.received += 1
        return pickle.loads(data)

    def alive(self) -> bool:
        return True  # not observable here: torchrun ends the job when a rank dies

    def death(self) -> str:
        return "is unreachable"

    def stop(self) -> None:
        self.send(None)


class Workers:
    """Ranks 1..W-1, joined to rank 0's process group and loaded: spawn() or launched()."""

    def __init__(self, config: EngineConfig, lines: list, store: dist.Store, device: torch.device):
        self.size, self.tp, self.lines, self.device = config.world_size, config.tensor_parallel_size, lines, device
        self.error: str | None = None
        self.comm_seconds = [0.0]
        self._finalizer = weakref.finalize(self, _stop, lines)
        for r in range(1, self.size):
            self.expect(r, "hello")  # started and imported: the rendezvous below will not wait on a dead rank
        self.group = process_group(store, 0, self.size, device, config.distributed_timeout)
        self.store = store
        self.reduce = all_reducer(self.group, self.comm_seconds)

    @property
    def procs(self) -> list[mp.Process]:
        """The worker processes this one started (none under torchrun)."""
        return [line.proc for line in self.lines if isinstance(line, _Pipe)]

    @property
    def healthy(self) -> bool:
        try:
            self.check()
        except WorkerLost:
            return False
        return True

    def expect(self, rank: int, what: str) -> Any:
        """Rank's next message, which must be `what`; WorkerLost if it reports an error or dies first."""
        line = self.lines[rank - 1]
        while not line.poll(0.1):
            if not line.alive():
                raise self.lost(f"worker rank {rank} {line.death()}")
        try:
            kind, payload = line.recv()
        except EOFError:
            raise self.lost(f"worker rank {rank} {line.death()}") from None
        if kind != what:
            raise self.lost(f"worker rank {rank} failed: {payload}")
        return payload

    def send(self, message: tuple | list[tuple]) -> None:
        """The message to every worker, or message[r - 1] to rank r."""
        self.check()
        for rank, line in enumerate(self.lines, 1):
            try:
                line.send(message[rank - 1] if isinstance(message, list) else message)
            except (BrokenPipeError, ConnectionError, EOFError, OSError):
                raise self.lost(f"worker rank {rank} {line.death()}") from None

    def check(self) -> None:
        """WorkerLost if a worker has ever been lost or is not running now."""
        if self.error is None:
            for rank, line in enumerate(self.lines, 1):
                if not line.alive():
                    self.lost(f"worker rank {rank} {line.death()}")
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
        """After a failed step: which worker died and why, else the failure itself."""
        for rank, line in enumerate(self.lines, 1):
            if isinstance(line, _Pipe):
                line.proc.join(timeout=0.5)  # a worker whose step failed is exiting
            if not line.alive():
                return self.lost(f"worker rank {rank} {line.death()}")
        return self.lost(f"the step failed on rank 0 ({type(e).__name__}: {e}), so the ranks are out of step")

    def close(self) -> None:
        self._finalizer()


def _stop(lines: list) -> None:
    for line in lines:
        line.stop()


def _check(path: str | os.PathLike, config: EngineConfig, last: torch.device) -> None:
    """Sizes that do not split the model, or devices that are missing: before any process starts."""
    layout(config, 0).check(ModelConfig.from_file(Path(path)))
    if last.type == "cuda" and last.index >= torch.cuda.device_count():
        raise FieldError("tensor_parallel_size", config.tensor_parallel_size, f"needs one CUDA device per rank, up "
                         f"to {last}; this machine has {torch.cuda.device_count()}", OWN)


def launched_rank(config: EngineConfig) -> int | None:
    """This process's rank when torchrun started it for this engine (WORLD_SIZE ranks), else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or config.world_size == 1:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != config.world_size:
        raise FieldError("tensor_parallel_size", config.tensor_parallel_size, f"x data_parallel_size="
                         f"{config.data_parallel_size} must equal torchrun's WORLD_SIZE={world}", OWN)
    return int(os.environ["RANK"])


def start(path: str | os.PathLike, config: EngineConfig) -> Workers:
    """Rank 0's workers: torchrun's other ranks when it launched this process, else spawned here."""
    if launched_rank(config) is None:
        return spawn(path, config)
    device = rank_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    _check(path, config, device)
    store = _torchrun_store(config)
    lines = [_StoreLine(store, f"to{r}", f"from{r}") for r in range(1, config.world_size)]
    return Workers(config, lines, store, device)


def spawn(path: str | os.PathLike, config: EngineConfig) -> Workers:
    """Start ranks 1..W-1 on this machine."""
    W = config.world_size
    _check(path, config, rank_device(config.device, W - 1))
    store = dist.TCPStore("127.0.0.1", 0, W, is_master=True, timeout=timedelta(seconds=config.distributed_timeout),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    lines = []
    for rank in range(1, W):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, name=f"openseek-rank{rank}", daemon=True,
                           args=(rank, store.port, str(path), config, torch.get_num_threads(), child))
        proc.start()
        child.close()
        lines.append(_Pipe(parent, proc))
    try:
        return Workers(config, lines, store, rank_device(config.device, 0))
    except BaseException:
        _stop(lines)
        raise


def _torchrun_store(config: EngineConfig) -> dist.Store:
    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=config.distributed_timeout)))
    return dist.PrefixStore("openseek", store)


def serve_as_worker(path: str | os.PathLike, config: EngineConfig) -> None:
    """A torchrun-launched rank > 0: load this rank's part and run rank 0's steps until it stops us."""
    rank = launched_rank(config)
    assert rank, "serve_as_worker is for torchrun's ranks other than 0"
    store = _torchrun_store(config)
    device = rank_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    _serve(rank, str(path), config, store, device, _StoreLine(store, f"from{rank}", f"to{rank}"))


def _worker_main(rank: int, port: int, path: str, config: EngineConfig, threads: int, conn: Any) -> None:
    """A spawned worker."""
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, config.world_size, is_master=False,
                          timeout=timedelta(seconds=config.distributed_timeout))
    _serve(rank, path, config, store, rank_device(config.device, rank), conn)


def _serve(rank: int, path: str, config: EngineConfig, store: dist.Store, device: torch.device, line: Any) -> None:
    """Join the group, load this rank's part, then run each step rank 0 sends until told to stop."""
    try:
        line.send(("hello", None))
        group = process_group(store, rank, config.world_size, device, config.distributed_timeout)
        reduce = all_reducer(group, [0.0])
        model = load_rank(path, config, rank, device, reduce)
        runner = None
        while (message := line.recv()) is not None:
            kind, payload = message
            if kind == "cache":
                runner = ModelRunner(model, *payload)
                line.send(("ready", None))
            elif kind == "step":
                runner.hidden_states(payload)
            elif kind == "dp_step":
                dp_forward(runner, *payload, reduce)
            elif kind == "stats":
                line.send(("stats", {**weight_bytes(model), "cache": runner.cache_bytes}))
    except EOFError:
        return  # rank 0 is gone
    except BaseException as e:
        try:
            line.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        traceback.print_exc()
        os._exit(1)  # the group's sockets close with the process: rank 0's collective fails instead of waiting
