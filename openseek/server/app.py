"""The HTTP layer: FastAPI routes, SSE, bearer-key auth, OpenAI-style errors, /health, /metrics, and `serve`.

    engine = LLMEngine.from_pretrained(PATH, EngineConfig(max_num_seqs=8))
    serve(build_app(AsyncEngine(engine), model_name="tiny"), host="127.0.0.1", port=8000)

SIGTERM (or Ctrl-C) drains: new requests get 503 while those in flight finish, then the process exits; a second
signal exits at once. If the engine loop dies, the process exits with status 1 (a supervisor restarts it) rather
than answer 503 forever.

With an API key, every route but /health needs it: the OpenAPI schema and its /docs and /redoc pages too, and
/metrics unless public_metrics (a Prometheus scraper often has no key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from . import tokenize as tk
from .async_engine import AsyncEngine
from .limits import BodyLimits, HTTPLimits, h11_protocol
from .metrics import Metrics
from .serving import OpenAIServing

logger = logging.getLogger(__name__)


class SSEResponse(StreamingResponse):
    """A text/event-stream that calls on_close however it ends: a client gone before or mid-stream is cleaned up."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, pricing: p.Pricing | None = None,
              public_metrics: bool = False, limits: HTTPLimits | None = None, reasoning_parser: str | None = None,
              tool_parser: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its lifespan starts and stops the engine loop.

    reasoning_parser / tool_parser: names from parsers.REASONING_PARSERS / TOOL_PARSERS (vLLM's flag values).
    """
    limits = limits or HTTPLimits()
    metrics = Metrics(engine.stats)
    serving = OpenAIServing(engine, model_name, metrics, pricing, reasoning_parser, tool_parser)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="openseek", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # the docs are added below, behind the key
    app.add_middleware(BodyLimits, max_bytes=limits.max_body_bytes, seconds=limits.read_timeout)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    _add_error_handlers(app, metrics)
    auth = [Depends(_bearer_check(api_key))] if api_key else []
    _add_docs(app, auth)

    @app.get("/health")
    async def health() -> Response:
        if engine.draining or not engine.alive or not engine.llm_engine.healthy:  # healthy: e.g. a worker lost
            return JSONResponse({"status": "draining" if engine.draining else "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[] if public_metrics else auth,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": p.now(), "owned_by": "openseek",
                "max_model_len": engine.llm_engine.max_model_len}
        return {"object": "list", "data": [card]}

    tokenizer_errors = {status: ERROR_RESPONSES[status] for status in (400, 401, 404, 408, 413)}

    @app.post("/tokenize", dependencies=auth, responses=tokenizer_errors)
    async def tokenize(req: tk.TokenizeRequest) -> dict:
        return await tk.tokenize(serving, req)

    @app.post("/detokenize", dependencies=auth, responses=tokenizer_errors)
    async def detokenize(req: tk.DetokenizeRequest) -> dict:
        return await tk.detokenize(serving, req)

    async def respond(route: str, req, raw: Request, job, stream, response) -> Response:
        """Stream the job as SSE, or wait for it unless the client hangs up first."""
        if req.stream:
            def closed() -> None:  # a stream that ended in an error event is counted as the 500 it stands for
                serving.abort(job)
                metrics.requests.labels(route, "500" if job.error else "200").inc()

            return SSEResponse(stream(req, job), on_close=closed)
        try:
            if not await _finished_before_hangup(raw, serving.collect(job)):
                metrics.requests.labels(route, "499").inc()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            serving.abort(job)  # a no-op unless the client left or the handler was cancelled
        metrics.requests.labels(route, "200").inc()
        return JSONResponse(response(req, job))

    @app.post("/v1/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def completions(req: p.CompletionRequest, raw: Request) -> Response:
        job = await serving.create_completion(req)
        return await respond("/v1/completions", req, raw, job, serving.stream_completion,
                             serving.completion_response)

    @app.post("/v1/chat/completions", dependencies=auth, responses=ERROR_RESPONSES)
    async def chat(req: p.ChatCompletionRequest, raw: Request) -> Response:
        job = await serving.create_chat(req)
        return await respond("/v1/chat/completions", req, raw, job, serving.stream_chat, serving.chat_response)

    return app


async def _finished_before_hangup(raw: Request, work) -> bool:
    """Run `work` unless the client hangs up first; then cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def hung_up() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # re-raises what the work raised
    return True


_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERRORS = {400: "invalid request (body, field or value)", 401: "missing or wrong API key", 404: "unknown model",
           408: "body not received in time", 413: "body too large", 429: "waiting queue full, retry later",
           500: "the engine failed this request", 503: "draining or over the connection limit"}
# the statuses the generation routes answer with, declared so the schema tells clients (and schemathesis) the truth
ERROR_RESPONSES = {status: {"description": why, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
                   for status, why in _ERRORS.items()} | {
    200: {"description": "a JSON response, or an SSE stream (text/event-stream) when stream is true",
          "content": {"text/event-stream": {}}}}


def _without_422(schema: dict) -> dict:
    """FastAPI documents request validation as 422; this server answers 400, as OpenAI does."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    return schema


def _add_docs(app: FastAPI, auth: list) -> None:
    """FastAPI's schema and docs pages, as routes that take the same dependencies as the API."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(_without_422(app.openapi()))

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    async def swagger() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def _bearer_check(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            message = "missing API key: send 'Authorization: Bearer KEY'" if not got else "incorrect API key"
            raise p.APIError(401, message, None, "invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        route = request.scope.get("route")  # unmatched paths share one label: clients cannot grow the registry
        metrics.requests.labels(route.path if route else "unmatched", str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(p.APIError)
    async def api_error(request: Request, e: p.APIError) -> JSONResponse:
        return reply(request, e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return reply(request, 400, p.error_body(message, code="json_invalid"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return reply(request, 400, p.error_body(message, param=param, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return reply(request, e.status_code, p.error_body(str(e.detail), code=str(e.status_code)), e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after this reply, so the traceback reaches the server log, never the client
        return reply(request, 500, p.error_body(f"internal server error: {type(e).__name__}", "server_error"))


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run `app` under uvicorn until SIGTERM / SIGINT, draining in-flight requests before exiting.

    Returns the exit status: 0 after a drain, 1 if the engine loop died.
    """
    make_server(app, host, port, log_level).run()
    return 1 if app.state.engine.died else 0


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The uvicorn.Server `serve` runs, with app.state.limits applied; a dead engine loop makes it exit."""
    import uvicorn

    engine: AsyncEngine = app.state.engine
    limits: HTTPLimits = app.state.limits

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if engine.draining:  # a second signal: stop now
                self.force_exit = self.should_exit = True
                return
            logger.info("signal %s: draining in-flight requests (send it again to stop at once)", sig)
            engine.drain(on_idle=self._stop)

        def _stop(self) -> None:
            self.should_exit = True  # the server's main loop polls this flag

    server = DrainingServer(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=h11_protocol(limits.read_timeout),
        timeout_keep_alive=limits.timeout_keep_alive, limit_concurrency=limits.limit_concurrency))
    engine.on_death = server._stop
    return server
