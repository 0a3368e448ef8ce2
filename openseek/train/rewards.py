"""Rewards as programs: a task's reward function runs in a subprocess with a timeout, a memory limit and no network,
so a reward that hangs, crashes, eats memory or prints garbage scores 0 and never stops training.

One subprocess scores a whole batch of completions (Python starts in ~20 ms, the rules take microseconds); if it
fails, each item is scored again in a subprocess of its own, so the failure stays with the item that caused it (as
the engine's sampler retries a failed batch row by row).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("reward_worker.py")
OUTPUT_LIMIT = 1 << 20  # bytes of result line read back; more is garbage


@dataclass(frozen=True, slots=True)
class Sandbox:
    timeout: float = 5.0  # seconds of wall clock per subprocess
    memory_mb: int = 512  # address space of the subprocess


def score(program: Path, function: str, items: list[dict], sandbox: Sandbox) -> list[dict[str, float] | None]:
    """Per item ({"completion", "answer"}), the program's {part: value}, or None where it failed (scored 0)."""
    if not items:
        return []
    program = Path(program).resolve()  # the worker runs in /
    results = _run(program, function, items, sandbox)
    if results is not None:
        return results
    log.warning("reward program %s:%s failed on a batch of %d; scoring each item alone", program.name, function,
                len(items))
    return [r[0] if (r := _run(program, function, [item], sandbox)) is not None else None for item in items]


def _run(program: Path, function: str, items: list[dict], sandbox: Sandbox) -> list | None:
    """The worker's result list for items, or None when the subprocess timed out, crashed or answered garbage."""
    cmd = [*_network_jail(), sys.executable, "-I", "-B", str(WORKER), str(program), function]
    limit = functools.partial(_limits, sandbox)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={}, cwd="/", preexec_fn=limit, start_new_session=True)
    try:
        out, _ = proc.communicate(json.dumps(items).encode(), timeout=sandbox.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: a program that forked dies too
        proc.communicate()
        log.warning("reward program %s:%s timed out after %g s", program.name, function, sandbox.timeout)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        return None
    try:
        results = json.loads(out[-OUTPUT_LIMIT:].decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    if not isinstance(results, list) or len(results) != len(items):
        return None
    return results


def _limits(sandbox: Sandbox) -> None:
    """In the child before exec: bounded memory, CPU time, file writes and open files."""
    memory = sandbox.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = math.ceil(sandbox.timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@functools.cache
def _network_jail() -> tuple[str, ...]:
    """`unshare -rn` (a network namespace with no interfaces) where this machine allows it; else nothing, and the
    worker's refusal of sockets is the only barrier (logged once)."""
    unshare = shutil.which("unshare")
    if unshare is not None:
        try:
            ok = subprocess.run([unshare, "-rn", sys.executable, "-c", ""], capture_output=True, timeout=10,
                                env={}).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, "-rn")
    log.warning("no network namespace for reward programs (unshare -rn unavailable); sockets are refused in-process")
    return ()


def total_reward(parts: dict[str, float] | None, weights: dict[str, float]) -> float:
    """The scalar reward: the weighted sum of the parts (a failed item, None, is 0)."""
    if parts is None:
        return 0.0
    return sum(weights.get(k, 0.0) * v for k, v in parts.items())
