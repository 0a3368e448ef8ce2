"""One client cannot cost another: body and time limits, tokenizing off the event loop, a request the engine fails,
an engine loop that fails outside a step, and which routes the API key covers (issue 13).

Most servers here run in this process (`InProcess`: the same uvicorn server `openseek serve` runs), so a test can
slow the tokenizer down or make the engine fail on purpose.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import build_tiny_folder
from openseek import EngineConfig, LLMEngine, SamplingParams
from openseek.engine import CompletionOutput, RequestOutput, StepOutput
from openseek.server.app import build_app
from openseek.server.async_engine import AsyncEngine, EngineFailed
from openseek.server.limits import HTTPLimits
from server_util import KEY, InProcess, Server

NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("limits") / "tiny")[0]


def serve(folder, engine_config: EngineConfig | None = None, **kw) -> tuple[InProcess, LLMEngine]:
    llm = LLMEngine.from_pretrained(folder, engine_config)
    return InProcess(build_app(AsyncEngine(llm), "tiny", **kw)), llm


def raw_request(url: str, data: bytes, wait: float) -> tuple[bytes, float]:
    """Send data on a fresh connection, then read until the server closes it: (all it sent, seconds taken)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(wait)
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass  # still open after `wait` seconds
    return got, time.monotonic() - start


# ---- item 1: a request the engine fails fails alone ----------------------------------------------------------------
POISON = [9, 9, 9, 9]  # the prompt whose request the fake engine fails


def fail_poisoned_requests(llm: LLMEngine) -> None:
    """Make llm fail, at its next step, every request whose prompt is POISON, as the engine reports a failure."""
    real_add, real_step, doomed = llm.add_requests, llm.step, set()

    def add_requests(requests):
        real_add(requests)
        doomed.update(rid for rid, prompt, _ in requests if list(prompt["prompt_token_ids"]) == POISON)

    def step():
        outs = [o for o in real_step() if o.request_id not in doomed]
        for rid in sorted(doomed):
            llm.abort(rid)
            out = RequestOutput(rid, None, POISON, [CompletionOutput(0, "", [], "error")], True, error="boom: NaN")
            outs.append(StepOutput(rid, 0, [], "", True, "error", output=out, error="boom: NaN"))
        doomed.clear()
        return outs

    llm.add_requests, llm.step = add_requests, step


def test_a_request_the_engine_fails_gets_500_or_an_error_event_and_the_others_finish(folder):
    srv, llm = serve(folder)
    fail_poisoned_requests(llm)

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            def post(prompt, stream=False):
                return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                            "stream": stream, **NO_EOS})
            return await asyncio.gather(post(POISON), post(POISON, stream=True), post([5, 6, 7]),
                                        post([5, 6, 7], stream=True))

    with srv:
        failed, failed_stream, ok, ok_stream = asyncio.run(run())
        deadline = time.monotonic() + 5  # a stream is counted once its connection is done with, just after the client
        while 'status="500"} 2.0' not in (metrics := httpx.get(f"{srv.url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
    assert failed.status_code == 500, failed.text
    err = failed.json()["error"]
    assert err["code"] == "server_error" and "boom: NaN" in err["message"], err
    events = [line.removeprefix("data: ") for line in failed_stream.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" and "boom: NaN" in json.loads(events[-2])["error"]["message"], events
    assert not any('"finish_reason": "error"' in e for e in events)  # no choice claims the failure as its own
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 20
    assert ok_stream.text.count('"text_completion"') == 20 and "error" not in ok_stream.text
    assert 'openseek_requests_total{route="/v1/completions",status="500"} 2.0' in metrics
    assert 'openseek_requests_total{route="/v1/completions",status="200"} 2.0' in metrics


# ---- item 3: tokenizing off the event loop, and never a prompt that cannot fit ------------------------------------
class SlowTokenizer:
    """The model's tokenizer, with an encode that takes `seconds` (as a megabyte prompt does) and is counted."""

    def __init__(self, tok, seconds: float):
        self._tok, self.seconds, self.calls = tok, seconds, 0

    def encode(self, text, **kw):
        self.calls += 1
        time.sleep(self.seconds)
        return self._tok.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_health_answers_while_a_prompt_is_tokenized(folder):
    llm = LLMEngine.from_pretrained(folder)
    llm.tokenizer = SlowTokenizer(llm.tokenizer, seconds=1.2)
    with InProcess(build_app(AsyncEngine(llm), "tiny")) as srv:
        for route, body in [("/v1/completions", {"prompt": "The quick brown fox"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
            done = []
            t = threading.Thread(target=lambda: done.append(httpx.post(f"{srv.url}{route}", timeout=30,
                                                                         json={**body, "max_tokens": 2})))
            t.start()
            time.sleep(0.2)  # the prompt is being tokenized now
            start = time.monotonic()
            assert httpx.get(f"{srv.url}/health").status_code == 200
            assert time.monotonic() - start < 0.6, f"/health waited for {route}'s tokenizer"
            t.join()
            assert done[0].status_code == 200, done[0].text


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(folder):
    llm = LLMEngine.from_pretrained(folder, EngineConfig(max_model_len=64))
    tok = llm.tokenizer
    longest = max(len(tok.id_to_token(i) or "") for i in range(tok.vocab_size))  # chars of the longest token
    limit = 64 * longest  # a longer text needs more than 64 tokens
    llm.tokenizer = slow = SlowTokenizer(tok, seconds=0)
    with InProcess(build_app(AsyncEngine(llm), "tiny")) as srv:
        cases = [("/v1/completions", "prompt", lambda n: {"prompt": "x" * n}),
                 ("/v1/completions", "prompt", lambda n: {"prompt": ["hi", "x" * n]}),
                 ("/v1/chat/completions", "messages",
                  lambda n: {"messages": [{"role": "system", "content": "x" * (n // 2)},
                                          {"role": "user", "content": "x" * (n - n // 2)}]})]
        for route, param, body in cases:
            r = httpx.post(f"{srv.url}{route}", json=body(limit + 1))
            assert r.status_code == 400 and slow.calls == 0, r.text
            err = r.json()["error"]
            assert err["param"] == param and f"more than {limit}" in err["message"], err
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x" * limit})  # may fit: tokenized, then judged
        assert slow.calls == 1 and r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]


# ---- item 4: body size, slow clients, connections -------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_by_content_length_or_while_chunked(folder):
    srv, _ = serve(folder, limits=HTTPLimits(max_body_bytes=4096))
    body = json.dumps({"prompt": "hi " * 2000, "max_tokens": 1}).encode()
    with srv:
        r = httpx.post(f"{srv.url}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"], r.text

        def chunks():  # no Content-Length: the limit counts the bytes as they come
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]
        r = httpx.post(f"{srv.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.request.headers.get("transfer-encoding") == "chunked", r.text
        # a declared gigabyte is refused at once, without waiting for (or reading) a byte of it
        got, took = raw_request(srv.url, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                                          b"\r\ncontent-length: 1000000000\r\n\r\n", wait=5)
        assert got.startswith(b"HTTP/1.1 413") and took < 2, got
        ok = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 1})
        assert ok.status_code == 200, ok.text


def test_a_client_that_stalls_in_its_headers_or_body_is_cut_off(folder):
    srv, _ = serve(folder, limits=HTTPLimits(read_timeout=1.0))
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    with srv:
        got, took = raw_request(srv.url, head + b'{"prompt": [5, 6],', wait=5)  # half a body, then silence
        assert got.startswith(b"HTTP/1.1 408") and b"1 s" in got and took < 3, (got, took)
        got, took = raw_request(srv.url, head[:30], wait=5)  # half the headers (slowloris)
        assert got == b"" and 0.9 < took < 3, (got, took)
        got, took = raw_request(srv.url, b"", wait=5)  # connects and says nothing
        assert got == b"" and 0.9 < took < 3, (got, took)
        assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 1}).status_code == 200


def test_connections_beyond_the_limit_get_503(folder):
    srv, _ = serve(folder, limits=HTTPLimits(limit_concurrency=3))
    with srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has accepted them
            assert httpx.get(f"{srv.url}/health").status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_serve_flags_set_the_limits_and_public_metrics(folder, tmp_path):
    srv = Server(folder, tmp_path / "flags.log", "--api-key", KEY, "--public-metrics", "--max-body-bytes", "2048",
                 "--read-timeout", "1")
    try:
        assert httpx.get(f"{srv.url}/metrics").status_code == 200  # no key needed
        assert httpx.get(f"{srv.url}/docs").status_code == 401  # the docs still need it
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi " * 1000},
                       headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"], r.text
        got, took = raw_request(srv.url, b"GET /health HTTP/1.1\r\n", wait=5)
        assert got == b"" and took < 3
    finally:
        assert srv.stop() == 0, srv.log.read_text()


# ---- item 11: what the API key covers -----------------------------------------------------------------------------
def test_public_metrics_opens_metrics_alone(folder):
    srv, _ = serve(folder, api_key=KEY, public_metrics=True)
    with srv:
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert httpx.get(f"{srv.url}{path}").status_code == 401, path
            assert httpx.get(f"{srv.url}{path}", headers={"authorization": f"Bearer {KEY}"}).status_code == 200, path


# ---- item 6: the engine loop survives what it can, and stops cleanly when it cannot ---------------------------------
def run_engine(llm: LLMEngine, work):
    """Run work(engine) on a started AsyncEngine; a handler nobody answers fails it within 10 s."""
    engine = AsyncEngine(llm)
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(work(engine), 10))
    finally:
        engine.shutdown()


async def generate(engine: AsyncEngine, rid: str, max_tokens: int = 3) -> list:
    q = await engine.add([(rid, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                                ignore_eos=True))])
    outs = [await q.get()]
    while isinstance(outs[-1], StepOutput) and outs[-1].output is None:
        outs.append(await q.get())
    return outs


def fail_once(obj, name: str, after: int):
    """Make obj.name raise RuntimeError on its call number `after` + 1, once."""
    real, calls = getattr(obj, name), []

    def flaky(*args):
        calls.append(1)
        if len(calls) == after + 1:
            raise RuntimeError(f"{name} broke")
        return real(*args)

    setattr(obj, name, flaky)


@pytest.mark.parametrize("name", ["stats", "abort"])
def test_a_failure_outside_a_step_leaves_the_loop_serving(folder, name):
    llm = LLMEngine.from_pretrained(folder)
    fail_once(llm, name, after=1)

    async def work(engine):
        first = await generate(engine, "a")
        engine.abort(["gone", "gone-too"])  # the second abort is the one that breaks, if it is abort
        second, third = await asyncio.gather(generate(engine, "b", 5), generate(engine, "c", 4))
        return engine.alive, first, second, third

    alive, *runs = run_engine(llm, work)
    assert alive
    assert [(len(r), r[-1].finish_reason) for r in runs] == [(3, "length"), (5, "length"), (4, "length")]
    assert llm.pool.num_free == llm.pool.num_blocks


def test_a_dead_loop_fails_its_requests_ends_the_drain_and_stops_the_server(folder):
    llm = LLMEngine.from_pretrained(folder)
    real, broken = llm.has_unfinished_requests, threading.Event()

    def has_unfinished_requests() -> bool:  # the loop's own bookkeeping, outside any step, breaks for good
        if broken.is_set():
            raise RuntimeError("bad loop")
        return real()

    llm.has_unfinished_requests = has_unfinished_requests
    engine = AsyncEngine(llm)
    with InProcess(build_app(engine, "tiny")) as srv:
        drained = threading.Event()

        async def work():
            q = await engine.add([("a", {"prompt_token_ids": [5, 6, 7]},
                                   SamplingParams(max_tokens=500, ignore_eos=True))])
            broken.set()
            while not isinstance(out := await q.get(), Exception):
                pass
            return out

        failure = asyncio.run(asyncio.wait_for(work(), 10))
        assert isinstance(failure, EngineFailed) and "bad loop" in str(failure)
        srv.thread.join(timeout=5)  # the server saw the death and exited on its own
        assert not srv.thread.is_alive() and engine.died and not engine.alive
        engine.drain(on_idle=drained.set)  # a SIGTERM now: nothing is in flight, so the drain is over at once
        assert drained.is_set()
