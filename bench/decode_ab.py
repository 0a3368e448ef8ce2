"""Decode step time of an old revision against the working tree, step by step, each side in its own process.

    python bench/decode_ab.py OLD_REV [--models bundled,bench] [--dtypes float32,bfloat16] [--batches 1,16]
                              [--rounds 7] [--new-tokens 32] [--new-fields compile=True] [--old-fields ...]

OLD_REV's `openseek` package is exported (git archive) to a temporary folder; each side runs in a worker process
whose path puts its own `openseek` first, and holds an engine per (model, dtype, batch) case on the same weights'
files. Each round, for every case, the two workers take their decode steps in turn (prefill excluded; which side
goes first alternates), told by this process over a pipe and timing each step themselves, so the load of other
processes falls on both alike. Half the rounds run with the old side's worker started first, half with the new
side's (the first started measured a few percent slower). The first round of each half warms up (and compiles,
with compile=True). Prints each side's median step time, the median of the paired steps' ratios old / new, and
whether both sides' greedy tokens agree. The workers' OpenMP threads spin only briefly after a parallel region
(WORKER_ENV): compare the two sides, not these times with other scripts' runs.

Why processes: both sides in one process measured identical code 1.13x and 1.31x apart (bench/results/measured.md),
and two revisions that both load openseek's C++ kernels cannot share one. Identical code this way: 0.98x (bench
checkpoint, compiled, batch 1), 1.00-1.01x (bundled, batches 1 and 8).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROMPT_LEN = {"bundled": 64, "bench": 256}
# the workers' OpenMP threads stop spinning soon after a parallel region (libgomp spins ~300k times by default):
# the idle side's spinning threads took the cores from the stepping side's (the bundled model's step measured
# 9.7 ms, 6.2 with this, 6.0 alone; OMP_WAIT_POLICY=PASSIVE 7.0, and 2x on a compiled step)
WORKER_ENV = {"GOMP_SPINCOUNT": "10000"}


def export_revision(rev: str) -> Path:
    """A folder holding OLD_REV's openseek package."""
    tmp = Path(tempfile.mkdtemp(prefix="openseek-ab-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "openseek"], capture_output=True, check=True)
    tar = tmp / "old.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as f:
        f.extractall(tmp, filter="data")
    return tmp


# ---- the worker: one side's engines --------------------------------------------------------------------------

def case_engine(case: dict):
    """An engine of the `openseek` first on the path for one case, and a function queueing its greedy requests."""
    import torch

    import openseek
    plen, new_tokens, batch = case["plen"], case["new_tokens"], case["batch"]
    defaults = dict(max_num_seqs=batch, enable_prefix_caching=False, max_model_len=plen + new_tokens + 16)
    llm = openseek.LLM(case["path"], dtype=getattr(torch, case["dtype"]), **(defaults | case["fields"]))
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, engine.model.config.vocab_size, (plen,), generator=g).tolist()}
               for _ in range(batch)]
    params = openseek.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def submit() -> None:
        for k, prompt in enumerate(prompts):
            engine.add_request(f"r-{k}", prompt, params)

    return engine, submit


def worker(spec: str) -> None:
    """Serve 'submit' (queue a case's requests and run their prefill, untimed) and 'step' (one timed decode step)
    as JSON lines on the stdout this process started with; everything printed goes to stderr."""
    import torch
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    engines = [case_engine(case) for case in spec["cases"]]
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        engine, submit = engines[cmd["case"]]
        if cmd["cmd"] == "submit":
            submit()
            engine.step()
            reply = {}
        else:
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            finished = {o.request_id: o.output.outputs[0].token_ids for o in outs if o.output is not None}
            reply = {"dt": dt, "finished": finished, "more": engine.has_unfinished_requests()}
        protocol.write(json.dumps(reply) + "\n")


# ---- the coordinator -----------------------------------------------------------------------------------------

class Side:
    """A worker process running the `openseek` under `pythonpath`."""

    def __init__(self, pythonpath: Path, spec: dict):
        env = WORKER_ENV | dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), str(BENCH)]))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.call(None)  # its engines are built

    def call(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a decode_ab worker exited (code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def paired_steps(sides: list[Side], case: int, first: int, times: list[list[float]], tokens: list[dict]) -> None:
    """Both sides' requests of one case to completion, stepping in turn, `first` first."""
    order = [first, 1 - first]
    for i in order:
        sides[i].call({"cmd": "submit", "case": case})
    active = set(order)
    while active:
        for i in order:
            if i in active:
                reply = sides[i].call({"cmd": "step", "case": case})
                times[i].append(reply["dt"])
                tokens[i].update(reply["finished"])
                if not reply["more"]:
                    active.discard(i)


def parse_fields(text: str) -> dict:
    """EngineConfig fields given as k=v,k=v, the values Python literals."""
    return {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("--models", default="bundled")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--new-fields", default="", help="EngineConfig fields of the new side, as k=v,k=v")
    p.add_argument("--old-fields", default="", help="the same for the old side (fields it knows)")
    args = p.parse_args()
    from common import BENCH_CHECKPOINT, machine_line, markdown_table

    import openseek
    keys = [(m, d, b) for m in args.models.split(",") for d in args.dtypes.split(",")
            for b in map(int, args.batches.split(","))]
    paths = {"bundled": str(openseek.BUNDLED_MODEL), "bench": str(BENCH_CHECKPOINT)}
    fields = parse_fields(args.old_fields), parse_fields(args.new_fields)
    specs = [{"threads": args.threads, "cases": [
        {"path": paths[m], "dtype": d, "batch": b, "plen": PROMPT_LEN[m], "new_tokens": args.new_tokens,
         "fields": f} for m, d, b in keys]} for f in fields]
    print(machine_line(), f"| old {args.old} {fields[0] or ''} vs working tree {fields[1] or ''}")
    roots = export_revision(args.old), ROOT
    times = {key: ([], []) for key in keys}
    tokens = {key: ({}, {}) for key in keys}
    # the worker started first steps a few percent slower (identical code: 1.04-1.05x, both ways round), so half the
    # rounds start the old side's first and half the new side's
    for first in (0, 1):
        sides = [None, None]
        for i in (first, 1 - first):
            sides[i] = Side(roots[i], specs[i])
        try:
            for r in range(-(-args.rounds // 2) + 1):  # the first round warms up
                for c, key in enumerate(keys):
                    steps = ([], [])
                    paired_steps(sides, c, (r + c) % 2, steps, tokens[key])
                    for side in (0, 1) if r else ():
                        times[key][side].extend(steps[side])
        finally:
            for side in sides:
                side.close()
    rows = []
    for key in keys:
        o, n = times[key]
        ratio = statistics.median(a / b for a, b in zip(o, n))
        rows.append([*key, f"{statistics.median(o) * 1e3:.2f}", f"{statistics.median(n) * 1e3:.2f}",
                     f"{ratio:.2f}x", "yes" if tokens[key][0] == tokens[key][1] else "NO"])
    print(markdown_table(["model", "dtype", "batch", "old ms/step", "new ms/step", "old / new (median of paired steps)",
                          "same greedy tokens"], rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
