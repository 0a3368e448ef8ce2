"""`openseek serve` under load: output tokens/s and p50/p99 time to first token at 1, 8 and 32 concurrent
streaming clients (the official `openai` client), and the HTTP layer's overhead against offline
`LLM.generate` on the same prompts.

    python bench/serve.py [--concurrency 1,8,32] [--prompt-len 128] [--new-tokens 32]

The server runs as a real `openseek serve` process on 127.0.0.1; offline runs happen in this process after
the server is stopped, so the two never share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import torch

from common import BENCH_CHECKPOINT, machine_line, make_bench_checkpoint, markdown_table, random_ids


SERVER_ENV: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, port: int, max_num_seqs: int) -> subprocess.Popen:
    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "openseek", "serve", "--model", path, "--port", str(port),
                             "--max-num-seqs", str(max_num_seqs), "--max-model-len", "2048",
                             "--served-model-name", "bench", "--log-level", "warning"],
                            env={**os.environ, **SERVER_ENV})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"openseek serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("openseek serve did not become healthy in 300 s")


async def one_client(client, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if ttft is None:
            ttft = time.perf_counter() - t0
        n += 1 if chunk.choices and chunk.choices[0].text is not None else 0
    return ttft, time.perf_counter() - t0, n


async def load(port: int, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """Wall time for all prompts at once, and each request's time to first token."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, p, new_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, [r[0] for r in results]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(BENCH_CHECKPOINT))
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement, served and offline alike (the "
                                                          "fastest is kept: single runs vary)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    make_bench_checkpoint(args.path)
    print(machine_line())
    vocab = 32000
    # fresh random prompts for every repeat, so no run hits the prefix cache of an earlier one
    workloads = {(c, r): random_ids(c, args.prompt_len, vocab, seed=1000 * r + c).tolist()
                 for c in levels for r in range(args.repeats)}
    port = free_port()
    server = start_server(args.path, port, max(levels))
    served = {}
    try:
        asyncio.run(load(port, random_ids(1, args.prompt_len, vocab, seed=999_999).tolist(), 2))  # warm-up
        for c in levels:
            served[c] = min((asyncio.run(load(port, workloads[c, r], args.new_tokens)) for r in range(args.repeats)),
                            key=lambda run: run[0])
    finally:
        server.terminate()
        server.wait(timeout=120)

    import openseek
    llm = openseek.LLM(args.path, dtype=torch.float32, max_num_seqs=max(levels), max_model_len=2048)
    params = openseek.SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate({"prompt_token_ids": random_ids(1, args.prompt_len, vocab, seed=999_999)[0].tolist()},
                 openseek.SamplingParams(max_tokens=2))
    rows = []
    for c in levels:
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": x} for x in workloads[c, r]], params)
            times.append(time.perf_counter() - t0)
        offline = min(times)
        wall, ttfts = served[c]
        rows.append([c, f"{c * args.new_tokens / wall:.1f}", f"{1e3 * pct(ttfts, 0.5):.0f}",
                     f"{1e3 * pct(ttfts, 0.99):.0f}", f"{wall:.2f}", f"{offline:.2f}",
                     f"{100 * (wall / offline - 1):+.1f}%"])
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens per request, greedy, streamed")
    print(markdown_table(["clients", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "served s", "offline s",
                          "HTTP overhead"], rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
