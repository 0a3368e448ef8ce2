"""Decode step time of an old revision against the working tree, alternating in one process, same weights.

    python bench/decode_ab.py OLD_REV [--models bundled,bench] [--dtypes float32,bfloat16] [--batches 1,16]
                              [--rounds 7] [--new-tokens 32]

OLD_REV's `openseek` package is exported (git archive) as `openseek_old` and imported beside the working tree's
(the package imports itself only relatively), so both run in one process on the same weights' files. Each round
runs every (model, dtype, batch) case on both sides, the two engines taking their decode steps in turn (prefill
excluded), so the load of other processes falls on both alike. The first round warms up (and compiles, with
--new-fields compile=True). Prints each side's median step time, the median of the paired steps' ratios
old / new, and whether both sides' greedy tokens agree. --old-fields / --new-fields set EngineConfig fields.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from common import BENCH_CHECKPOINT, machine_line, markdown_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openseek  # noqa: E402  the working tree's

PROMPT_LEN = {"bundled": 64, "bench": 256}


def import_revision(rev: str) -> object:
    """OLD_REV's openseek package, imported as openseek_old."""
    tmp = Path(tempfile.mkdtemp(prefix="openseek-ab-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "openseek"], capture_output=True, check=True)
    tar = tmp / "old.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as f:
        f.extractall(tmp, filter="data")
    (tmp / "openseek").rename(tmp / "openseek_old")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("openseek_old")


def case_engine(pkg, path: Path, dtype: torch.dtype, batch: int, new_tokens: int, plen: int, **fields):
    """An engine of `pkg`, and a function queueing `batch` greedy requests of fixed random prompts on it."""
    defaults = dict(max_num_seqs=batch, enable_prefix_caching=False, max_model_len=plen + new_tokens + 16)
    llm = pkg.LLM(str(path), dtype=dtype, **(defaults | fields))  # fields given override the defaults
    engine = llm.llm_engine
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (plen,), generator=g).tolist()} for _ in range(batch)]
    params = pkg.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def submit(tag: str) -> None:
        for k, prompt in enumerate(prompts):
            engine.add_request(f"{tag}-{k}", prompt, params)

    return engine, submit


def timed_steps(old, new, tokens: dict) -> tuple[list[float], list[float]]:
    """Step both engines to completion, alternating step by step; the decode steps' seconds of each side."""
    times = ([], [])
    for side, (engine, submit) in enumerate((old, new)):
        submit("r")
        engine.step()  # the prefill: not timed
    while old[0].has_unfinished_requests() or new[0].has_unfinished_requests():
        for side, (engine, _) in enumerate((old, new)):
            if engine.has_unfinished_requests():
                t0 = time.perf_counter()
                outs = engine.step()
                times[side].append(time.perf_counter() - t0)
                for out in outs:
                    if out.output is not None:
                        tokens[side, out.request_id] = out.output.outputs[0].token_ids
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("--models", default="bundled")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-fields", default="", help="EngineConfig fields of the new side, as k=v,k=v (ints/bools)")
    p.add_argument("--old-fields", default="", help="the same for the old side (fields it knows)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old = import_revision(args.old)
    fields, old_fields = ({k: eval(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}  # noqa: S307
                          for text in (args.new_fields, args.old_fields))
    print(machine_line(), f"| old {args.old} {old_fields or ''} vs working tree {fields or ''}")
    cases, rows = {}, []
    for model in args.models.split(","):
        path = openseek.BUNDLED_MODEL if model == "bundled" else BENCH_CHECKPOINT
        for dtype in args.dtypes.split(","):
            for b in map(int, args.batches.split(",")):
                key = (model, dtype, b)
                plen = PROMPT_LEN[model]
                cases[key] = (case_engine(old, path, getattr(torch, dtype), b, args.new_tokens, plen, **old_fields),
                              case_engine(openseek, path, getattr(torch, dtype), b, args.new_tokens, plen, **fields))
    times = {key: ([], []) for key in cases}
    tokens = {key: {} for key in cases}
    for _ in range(args.rounds + 1):  # the first round warms up
        for key, (old_case, new_case) in cases.items():
            o, n = timed_steps(old_case, new_case, tokens[key])
            if _:
                times[key][0].extend(o)
                times[key][1].extend(n)
    for key in cases:
        o, n = times[key]
        got = tokens[key]
        same = all(got[0, rid] == got[1, rid] for side, rid in got if side == 0)
        ratio = statistics.median(a / b for a, b in zip(o, n))
        rows.append([*key, f"{statistics.median(o) * 1e3:.2f}", f"{statistics.median(n) * 1e3:.2f}",
                     f"{ratio:.2f}x", "yes" if same else "NO"])
    print(markdown_table(["model", "dtype", "batch", "old ms/step", "new ms/step", "old / new (median of paired steps)",
                          "same greedy tokens"], rows))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
