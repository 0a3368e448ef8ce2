"""Soak `openseek serve` with mixed traffic at a bounded rate over loopback and watch its memory: streamed and
whole chat and completions (the official `openai` client), clients that hang up mid-stream or mid-request, and bad
inputs (invalid JSON, wrong types, huge max_tokens, negative n, lone surrogates, oversized prompts) sent raw with
httpx. It samples the server's RSS and cache gauges every --sample seconds, then reports RSS by minute, the
gauges once idle, replies by status per request kind, and whether RSS stayed within 10% of its value at the end
of warm-up (the first --warmup fraction of the run).

    python bench/soak.py [--minutes 30] [--rate 2] [--concurrency 8] [--url URL --pid PID] [--out FILE]

Without --url it starts `openseek serve` on the bundled model on a free loopback port; the table goes to
bench/results/soak.txt. Exit status 1 on a 5xx, a hang, a changed reference completion, blocks held once idle,
or RSS growth past 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import openai

from loopback import ROOT, reference, rss_mb, start_server, stop_server, wait_idle, gauges

SERVER_ARGS = ["--max-num-seqs", "8", "--max-model-len", "512"]
HANG_S = 120.0  # no request of this mix may take longer on the bundled model
MODEL = "openseek-demo"


# ---- request kinds: each returns an outcome label (an HTTP status, or what the client saw) ---------------------
async def chat(oa: openai.AsyncOpenAI, http: httpx.AsyncClient, rng: random.Random) -> str:
    r = await oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": _words(rng, 20)}],
                                         max_tokens=rng.randint(1, 48), temperature=rng.choice([0, 0.7, 1.0]),
                                         seed=rng.randint(0, 100))
    return f"200 {r.choices[0].finish_reason}"


async def chat_stream(oa, http, rng) -> str:
    stream = await oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": _words(rng, 20)}],
                                              max_tokens=rng.randint(1, 48), stream=True, n=rng.choice([1, 2]),
                                              stream_options={"include_usage": True})
    async for _ in stream:
        pass
    return "200"


async def completion(oa, http, rng) -> str:
    r = await oa.completions.create(model=MODEL, prompt=_words(rng, 30), max_tokens=rng.randint(1, 48),
                                    logprobs=rng.choice([None, 3]), stop=rng.choice([None, ["\n"]]),
                                    extra_body={"top_k": rng.choice([None, 20]), "repetition_penalty": 1.1})
    return f"200 {r.choices[0].finish_reason}"


async def completion_stream(oa, http, rng) -> str:
    stream = await oa.completions.create(model=MODEL, prompt=_words(rng, 30), max_tokens=rng.randint(1, 48),
                                         stream=True, temperature=0.8)
    async for _ in stream:
        pass
    return "200"


async def abort_stream(oa, http, rng) -> str:
    """Read a few events of a long stream, then hang up: its blocks must come back."""
    body = {"model": MODEL, "prompt": _words(rng, 30), "max_tokens": 400, "stream": True, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if n >= rng.randint(2, 20):
                break
        return f"{r.status_code} hung up"


async def abort_request(oa, http, rng) -> str:
    """Hang up on a whole (non-streamed) request while it generates."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True}
    try:
        r = await http.post("/v1/chat/completions", json=body, timeout=rng.uniform(0.05, 1.0))
        return _status(r)
    except httpx.ReadTimeout:
        return "hung up"


BAD_BODIES = {  # name -> raw request body, sent to /v1/completions unless it names messages
    "invalid_json": b'{"prompt": "hi", "max_tokens": ',
    "wrong_types": json.dumps({"prompt": {"a": 1}, "max_tokens": "many", "temperature": [1]}).encode(),
    "chat_wrong_types": json.dumps({"messages": "hello", "n": "two"}).encode(),
    "huge_max_tokens": json.dumps({"prompt": "hi", "max_tokens": 10**12}).encode(),
    "negative_n": json.dumps({"prompt": "hi", "n": -3}).encode(),
    "lone_surrogate": b'{"prompt": "a\\ud800b", "max_tokens": 4}',
    "chat_lone_surrogate": b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 4}',
    "oversized_prompt": json.dumps({"prompt": "lorem ipsum " * 40_000, "max_tokens": 4}).encode(),  # ~480 KB
    # 0 in float32, and a penalty that overflows: a request's sampling parameters must not fail its neighbours
    "tiny_temperature": json.dumps({"prompt": "hi", "temperature": 1e-46, "max_tokens": 8}).encode(),
    "tiny_repetition_penalty": json.dumps({"prompt": "hi", "repetition_penalty": 1e-40, "max_tokens": 8}).encode(),
}


def bad_input(name: str):
    async def send(oa, http, rng) -> str:
        route = "/v1/chat/completions" if b'"messages"' in BAD_BODIES[name] else "/v1/completions"
        r = await http.post(route, content=BAD_BODIES[name], headers={"content-type": "application/json"})
        return _status(r)
    return send


def _status(r: httpx.Response) -> str:
    if r.status_code >= 500:
        r.raise_for_status()  # to `one`, which keeps the body
    return str(r.status_code)


KINDS = {"chat": (chat, 4), "chat_stream": (chat_stream, 4), "completion": (completion, 4),
         "completion_stream": (completion_stream, 4), "abort_stream": (abort_stream, 2),
         "abort_request": (abort_request, 2), **{name: (bad_input(name), 1) for name in BAD_BODIES}}


def _words(rng: random.Random, n: int) -> str:
    vocab = "the a cat dog runs over under quick brown fox lazy sun moon river stone tree code server".split()
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, n)))


async def one(kind: str, oa, http, rng, results: dict[str, Counter], failures: dict[tuple[str, str], str]) -> None:
    """Send one request of this kind; a 5xx, a hang or a client-side error keeps its first reply in `failures`."""
    detail = ""
    try:
        outcome = await asyncio.wait_for(KINDS[kind][0](oa, http, rng), HANG_S)
    except asyncio.TimeoutError:
        outcome = "hang"
    except openai.APIStatusError as e:
        outcome, detail = str(e.status_code), e.response.text
    except httpx.HTTPStatusError as e:
        outcome, detail = str(e.response.status_code), e.response.text
    except (openai.APIError, httpx.HTTPError) as e:  # an error event inside a 200 stream, a dropped connection
        outcome, detail = f"error: {type(e).__name__}", str(e)
    results[kind][outcome] += 1
    if outcome == "hang" or outcome[:1] == "5" or outcome.startswith("error"):
        failures.setdefault((kind, outcome), detail[:300])


# ---- the run ---------------------------------------------------------------------------------------------------
async def traffic(url: str, seconds: float, rate: float, concurrency: int, seed: int,
                  results: dict[str, Counter], failures: dict) -> None:
    """Start a request of a random kind every 1/rate seconds, never more than `concurrency` at once."""
    rng = random.Random(seed)
    names, weights = list(KINDS), [w for _, w in KINDS.values()]
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=HANG_S + 10) as oa, \
            httpx.AsyncClient(base_url=url, timeout=HANG_S + 10, limits=limits) as http:
        slots, tasks = asyncio.Semaphore(concurrency), set()
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            await slots.acquire()
            kind = rng.choices(names, weights)[0]
            task = asyncio.create_task(one(kind, oa, http, random.Random(rng.random()), results, failures))
            task.add_done_callback(lambda t: (slots.release(), tasks.discard(t)))
            tasks.add(task)
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)


async def sampler(url: str, pid: int | None, every: float, t0: float, samples: list[dict]) -> None:
    while True:
        t = time.monotonic()
        g = await asyncio.to_thread(gauges, url)  # its latency shows a blocked event loop
        samples.append({"t": t - t0, "scrape_ms": 1e3 * (time.monotonic() - t),
                        "rss": rss_mb(pid) if pid else float("nan"), **g})
        await asyncio.sleep(every)


async def soak(url: str, pid: int | None, args) -> tuple[dict[str, Counter], dict, list[dict]]:
    results, failures, samples = defaultdict(Counter), {}, []
    t0 = time.monotonic()
    watch = asyncio.create_task(sampler(url, pid, args.sample, t0, samples))
    try:
        await traffic(url, args.minutes * 60, args.rate, args.concurrency, args.seed, results, failures)
    finally:
        watch.cancel()
    return results, failures, samples


def rss_verdict(samples: list[dict], warmup: float) -> tuple[bool, str]:
    """RSS flat within 10%: the largest sample after warm-up against the sample at its end."""
    end = samples[-1]["t"] * warmup
    base = next(s["rss"] for s in samples if s["t"] >= end)
    peak = max(s["rss"] for s in samples if s["t"] >= end)
    ok = peak <= 1.10 * base
    return ok, (f"RSS at warm-up end ({end:.0f} s) {base:.1f} MB, max after {peak:.1f} MB "
                f"({100 * (peak / base - 1):+.1f}%): {'flat within 10%' if ok else 'GREW more than 10%'}")


def render(results, failures, samples, idle, refs, verdict, command) -> str:
    from common import machine_line, markdown_table

    by_minute: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        by_minute[int(s["t"] // 60)].append(s)
    rss_rows = [[m, f"{ss[-1]['rss']:.1f}", f"{max(s['rss'] for s in ss):.1f}",
                 f"{max(s['openseek_kv_cache_usage'] for s in ss):.2f}",
                 max(int(s["openseek_num_requests_running"]) for s in ss),
                 f"{max(s['scrape_ms'] for s in ss):.0f}"] for m, ss in sorted(by_minute.items())]
    outcomes = sorted({o for c in results.values() for o in c})
    rows = [[k, sum(c.values()), *(c.get(o, 0) for o in outcomes)] for k, c in sorted(results.items())]
    fivexx = sum(n for c in results.values() for o, n in c.items() if o[:1] == "5")
    hangs = sum(c.get("hang", 0) for c in results.values())
    lines = [command, machine_line(), "",
             markdown_table(["minute", "RSS MB (last)", "RSS MB (max)", "max cache usage", "max running",
                             "max /metrics ms"], rss_rows),
             "", verdict[1], "",
             markdown_table(["kind", "requests", *outcomes], rows), "",
             f"5xx: {fivexx}, hangs (> {HANG_S:.0f} s): {hangs}, client-side errors: "
             f"{sum(o.startswith('error') for _, o in failures)}",
             f"gauges once idle: {json.dumps(idle)}",
             f"reference completion before / after: {refs[0]!r} / {refs[1]!r}"]
    if failures:
        lines += ["", "## first reply of each failure (request bodies: BAD_BODIES and KINDS in bench/soak.py)",
                  *(f"{kind} -> {outcome}: {detail}" for (kind, outcome), detail in sorted(failures.items()))]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=2.0, help="requests started per second")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS and gauge samples")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS must stay flat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="soak this server instead of starting one (give --pid to sample its RSS)")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.txt")
    args = ap.parse_args()
    proc, url = (None, args.url) if args.url else start_server(SERVER_ARGS, Path("/tmp/openseek-soak-server.log"))
    pid = proc.pid if proc else args.pid
    try:
        before = reference(url)
        results, failures, samples = asyncio.run(soak(url, pid, args))
        idle = wait_idle(url)
        after = reference(url)
    finally:
        if proc is not None:
            stop_server(proc)
    verdict = rss_verdict(samples, args.warmup) if pid else (True, "RSS not sampled: no --pid")
    command = (f"python bench/soak.py --minutes {args.minutes:g} --rate {args.rate:g} --concurrency "
               f"{args.concurrency} --seed {args.seed}" + (f" (server: openseek serve {' '.join(SERVER_ARGS)})"
                                                           if proc else f" --url {url}"))
    text = render(results, failures, samples, idle, (before, after), verdict, command)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    bad = any(outcome[:1] == "5" or outcome == "hang" for _, outcome in failures)
    raise SystemExit(1 if bad or any(idle.values()) or before != after or not verdict[0] else 0)


if __name__ == "__main__":
    main()
