"""What one client may cost the server: body size, time to send a request, connections, idle keep-alive.

uvicorn bounds the concurrency (`limit_concurrency`: a 503 beyond it), idle keep-alive connections and the size
of a request head (h11's 16 KiB), but not the time a client takes to send its head or its body, nor the body's
size; BodyLimits and h11_protocol do. (FastAPI's own max_body_size answers a too-large Content-Length with a
plain-text 413 whatever the app replies, not OpenAI's JSON error.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body


@dataclass(frozen=True)
class HTTPLimits:
    # 16 MiB: a full 163840-token DeepSeek-V2 context is about 1.3 MB of JSON token ids and under 2 MB of text
    # for most scripts, which leaves room for batches of prompts (TGI's default is 2 MB, ngrok's AI gateway 32 MiB)
    max_body_bytes: int = 16 * 2**20
    # seconds for a request's head (from its first byte, or from connecting) and again for its body; nginx's
    # client_header_timeout and client_body_timeout are 60 s
    read_timeout: float = 60.0
    # seconds an idle keep-alive connection stays open: uvicorn's and vLLM's default
    timeout_keep_alive: int = 5
    # open connections before new requests get 503: below the common 1024 open-file limit, so the server says
    # so instead of failing to accept; well above the engine's default 256 waiting + running sequences
    limit_concurrency: int | None = 1000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "read_timeout", "timeout_keep_alive", "limit_concurrency"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} is invalid: it must be positive")


class BodyLimits:
    """Pure ASGI middleware: a body over max_bytes is a 413, one not fully received within `seconds` of its head a
    408, both before the rest is read.

    A Content-Length over the limit is answered at once, without calling the app. Otherwise the limits are
    HTTPExceptions raised from receive(), answered like any other error of the route. Only the body is watched:
    reads after its end (a handler waiting for the client to hang up) pass through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, seconds: float):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than {self.max_bytes} bytes (--max-body-bytes)",
                             {"connection": "close"})  # the rest of the body is not worth reading

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            e = self.too_large()
            await JSONResponse(error_body(e.detail, code="413"), 413, e.headers)(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        received, body_done = 0, False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s "
                                         "(--read-timeout)", {"connection": "close"}) from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def h11_protocol(head_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request head: a client that connects and sends nothing,
    or dribbles its headers a byte at a time (slowloris), is disconnected after head_timeout seconds."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a head still incomplete: its clock runs from its first byte
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # h11 cannot answer a request it has not received; nginx closes too

    return HeadDeadline
