"""A real `openseek serve` process for tests, driven over loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"


class Server:
    """`openseek serve` on a free loopback port (folder None: the bundled model), healthy before it returns."""

    def __init__(self, folder: Path | None, log: Path, *args: str, name: str | None = "tiny"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "openseek", "serve", "--port", str(self.port), "--log-level", "warning", *args]
        cmd += ["--model", str(folder)] if folder is not None else []
        cmd += ["--served-model-name", name] if name is not None else []
        with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in 60 s:\n{log.read_text()}")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", KEY), max_retries=0, **kw)

    def async_client(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics (the key is sent: a server with --api-key guards /metrics too)."""
        text = httpx.get(f"{self.url}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        pairs = (line.split(" ") for line in text.splitlines() if line[:1] != "#")
        return {k: float(v) for k, v in pairs if "{" not in k}

    def counter(self, name: str) -> float:
        return self.metrics()[name]

    def gauges(self) -> dict[str, float]:
        names = ("openseek_num_requests_waiting", "openseek_num_requests_running", "openseek_kv_cache_usage")
        return {k: v for k, v in self.metrics().items() if k in names}

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """The engine gauges once nothing runs, waits or holds a block (aborts land shortly after a hang-up)."""
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges()
            if not any(g.values()) or time.monotonic() > deadline:
                return g
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class InProcess:
    """An app served in a thread of this process by the uvicorn server `openseek serve` runs (its limits, its
    protocol), so a test can reach into the engine behind it."""

    def __init__(self, app):
        from openseek.server.app import make_server

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, "warning")
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the in-process server did not stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
