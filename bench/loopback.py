"""A real `openseek serve` on a free loopback port for bench/fuzz_api.py and bench/soak.py: start it, scrape its
engine gauges, read its resident memory, wait until it is idle, and send a reference request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
GAUGES = ("openseek_num_requests_waiting", "openseek_num_requests_running", "openseek_kv_cache_usage")
# A greedy completion: the same text before and after a run means no request changed the server's state.
REFERENCE = {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`openseek serve ARGS` (the bundled model unless ARGS name one) -> (process, base URL) once /health is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "openseek", "serve", "--port", str(port), "--log-level", "warning", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"openseek serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"openseek serve was not healthy after 120 s; see {log}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (which drains), then SIGKILL after 30 s; -> the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def gauges(url: str) -> dict[str, float]:
    """The engine gauges of /metrics (waiting, running, KV-cache usage; prefix-cached free blocks count as free)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pairs = (line.split(" ") for line in text.splitlines() if line[:1] != "#" and " " in line)
    return {k: float(v) for k, v in pairs if k in GAUGES}


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """The gauges once nothing waits, runs or holds a block, or as they are after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        if not any(g.values()) or time.monotonic() > deadline:
            return g
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reference(url: str) -> str:
    """The reference completion's text (raises unless the server answers 200)."""
    r = httpx.post(f"{url}/v1/completions", json=REFERENCE, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]
