"""The one engine loop: a background thread owns the LLMEngine; asyncio handlers talk to it through queues.

The engine is not thread-safe, so every add_requests / abort / step happens on the loop thread. Handlers put
commands on a thread-safe queue; each step's deltas go back to per-request asyncio queues through one
`loop.call_soon_threadsafe` per step. The engine's own rules (admission, fan-out, validation) answer `add`.

A failure is contained where it happens: a command that raises fails its own requests, a step that raises fails
those in flight, stats that cannot be read keep the last snapshot, a reply to a closed event loop aborts its
requests. Anything else means the loop itself is broken: it fails every request, ends a drain, calls on_death (the
server exits rather than answer 503 forever) and stops.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine import EngineStats, LLMEngine, Prompt, SamplingParams

logger = logging.getLogger(__name__)

_STOP = object()


class Draining(Exception):
    """The server is shutting down: it finishes what it has and accepts nothing new."""


class EngineFailed(Exception):
    """The engine failed a request: a step raised (those in flight were aborted), or it failed this one alone."""


@dataclass(slots=True)
class _Add:
    requests: list[tuple[str, Prompt, SamplingParams]]
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


@dataclass(slots=True)
class _Drain:
    on_idle: Callable[[], None]


class AsyncEngine:
    """Drives an LLMEngine from one thread; `add` and `abort` may be called from any event loop."""

    def __init__(self, llm_engine: LLMEngine, threads: int | None = None):
        self.llm_engine = llm_engine
        self.threads = threads  # torch intra-op threads of the loop thread (see cmd_serve)
        self._stats = llm_engine.stats()  # replaced (never mutated) by the loop thread after every iteration
        self.draining = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # SimpleQueue.put is safe in signal handlers
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._on_idle: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._dead = False  # set by the loop thread before it gives up, so drain() knows nobody will answer
        self.on_death: Callable[[], None] | None = None  # called from the loop thread if it dies

    # ---- called from handlers ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine's stats after the loop's latest iteration (safe from any thread)."""
        return self._stats

    @property
    def died(self) -> bool:
        """The loop thread gave up on an error (not stopped by shutdown)."""
        return self._dead

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    async def add(self, requests: list[tuple[str, Prompt, SamplingParams]]) -> asyncio.Queue:
        """Queue (request_id, prompt, params) triples, all or none; their StepOutputs arrive on the returned queue.

        Raises what LLMEngine.add_requests raises (ValueError, QueueFull), or Draining.
        """
        if not self.alive:
            raise EngineFailed("the engine loop is not running")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()
        self._commands.put(_Add(requests, deltas, loop, done))
        try:
            await done
        except asyncio.CancelledError:  # the client left while we waited: the requests may have been added
            self.abort([rid for rid, _, _ in requests])
            raise
        return deltas

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._commands.put(_Abort(list(request_ids)))

    def drain(self, on_idle: Callable[[], None]) -> None:
        """Refuse new requests from now on; call on_idle once nothing is in flight (from the loop thread, or at
        once if it is dead; in a race with its death, twice: on_idle must be idempotent)."""
        self.draining = True
        self._commands.put(_Drain(on_idle))
        if self._thread is not None and not self.alive:  # checked after the put: the dying thread reads it or we do
            on_idle()

    def start(self) -> None:
        assert self._thread is None, "the engine loop is already started"
        self._thread = threading.Thread(target=self._run, name="openseek-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop thread, aborting whatever is still in flight, and the engine's worker processes if any."""
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join()
        self.llm_engine.shutdown()

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread: the loop thread's own OpenMP team
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: nobody would ever answer the handlers otherwise
            logger.exception("the engine loop died; the server stops")
            self._die(EngineFailed(f"the engine loop died: {type(e).__name__}: {e}"))

    def _die(self, error: EngineFailed) -> None:
        """Answer everyone who waits (requests, pending adds, a drain), then tell the server."""
        self._dead = True  # before reading the commands: a drain() after this sees it
        self._fail_all(error, abort=False)
        for cmd in self._next_commands(block=False):
            if isinstance(cmd, _Add):
                _reply(cmd.loop, _resolve, cmd.done, error)
            elif isinstance(cmd, _Drain):
                self._on_idle = self._on_idle or cmd.on_idle
        for callback in (self._on_idle, self.on_death):
            if callback is not None:
                callback()

    def _loop(self) -> None:
        engine = self.llm_engine
        while True:
            for cmd in self._next_commands(block=not engine.has_unfinished_requests()):
                if cmd is _STOP:
                    self._fail_all(Draining("the server stopped before the request finished"))
                    return
                try:
                    self._handle(cmd)
                except Exception:  # _add answers its own handler; an abort's client is gone; a drain cannot fail
                    logger.exception("the engine loop failed on a %s command; carrying on", type(cmd).__name__)
            if engine.has_unfinished_requests():
                try:
                    outs = engine.step()
                except Exception as e:  # a bug, not a bad request: fail what is in flight and keep serving
                    logger.exception("engine step failed; aborting %d requests", len(self._streams))
                    self._fail_all(EngineFailed(f"the engine failed while generating: {type(e).__name__}: {e}"))
                    outs = []
                self._publish()
                self._dispatch(outs)
                if not engine.healthy:  # its model can no longer run (a lost tensor-parallel worker): stop serving
                    self._die(EngineFailed("the engine can no longer run its model; see the server log"))
                    return
            else:
                self._publish()
            if self._on_idle is not None and not engine.has_unfinished_requests():
                on_idle, self._on_idle = self._on_idle, None
                try:
                    on_idle()
                except Exception:
                    logger.exception("the drain callback failed")

    def _next_commands(self, block: bool) -> list:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                self._streams.pop(rid, None)
                self.llm_engine.abort(rid)
        elif isinstance(cmd, _Drain):
            self._on_idle = cmd.on_idle
        else:
            self._add(cmd)

    def _add(self, cmd: _Add) -> None:
        error = Draining("the server is shutting down and accepts no new requests") if self.draining else None
        if error is None:
            try:
                self.llm_engine.add_requests(cmd.requests)
            except Exception as e:  # ValueError and QueueFull name the problem; anything else is reported too
                error = e
        if error is None:
            for rid, _, _ in cmd.requests:
                self._streams[rid] = (cmd.loop, cmd.queue)
        if not _reply(cmd.loop, _resolve, cmd.done, error) and error is None:
            self._abort([rid for rid, _, _ in cmd.requests])

    def _dispatch(self, outs: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            done = out.output is not None or out.finish_reason == "error"  # the request's last delta, or its failure
            stream = self._streams.pop(out.request_id, None) if done else self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in by_loop.items():
            if not _reply(loop, _put_all, items):
                self._abort([rid for rid, (lp, _) in list(self._streams.items()) if lp is loop])

    def _abort(self, request_ids: list[str]) -> None:
        """Abort requests whose event loop is closed: nobody will read their output."""
        for rid in request_ids:
            self._streams.pop(rid, None)
            self.llm_engine.abort(rid)

    def _fail_all(self, error: Exception, abort: bool = True) -> None:
        streams, self._streams = self._streams, {}
        for loop, q in streams.values():
            _reply(loop, q.put_nowait, error)
        if abort:
            for rid in streams:
                self.llm_engine.abort(rid)
            self._publish()

    def _publish(self) -> None:
        try:
            self._stats = self.llm_engine.stats()
        except Exception:  # metrics only: the last snapshot stays, and generation goes on
            logger.exception("reading the engine's stats failed; /metrics keeps the previous snapshot")


def _reply(loop: asyncio.AbstractEventLoop, callback, *args) -> bool:
    """Schedule callback on a handler's loop; False if that loop is closed (its handlers are gone)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _resolve(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():  # the handler was cancelled; it aborts the requests itself
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)
