"""Old commit against new, alternating in one run: decode throughput and the training step, openseek alone.

    python bench/ab.py OLD_REV [NEW_REV] [--rounds 3] [--probes decode train_step]

Each revision is checked out into a temporary git worktree; every round runs each probe once per revision, in
a fresh process whose PYTHONPATH puts that revision's `openseek` first, alternating, so the machine's drift hits
both sides alike. NEW_REV defaults to the working tree itself. Prints every run and the median ratio new / old.

A probe is this file run as `--probe NAME`: it imports whatever `openseek` is first on the path, so it must work
with the old layout as with the new one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


# ---- probes: run inside one revision ------------------------------------------------------------------------
def probe_decode(dtype_name: str, shapes: tuple = ((1, 256), (16, 512))) -> dict[str, float]:
    """Decode tok/s of LLM.generate on the bench checkpoint (default: batch 1 x 256 and 16 x 512), 32 new tokens."""
    import torch

    from common import BENCH_CHECKPOINT, make_bench_checkpoint, random_ids

    import openseek

    make_bench_checkpoint(BENCH_CHECKPOINT)
    llm = openseek.LLM(str(BENCH_CHECKPOINT), dtype=getattr(torch, dtype_name), max_num_seqs=64,
                       enable_prefix_caching=False, max_model_len=2048, max_num_batched_tokens=4096)
    out = {}
    for n, plen in shapes:
        prompts = [{"prompt_token_ids": row} for row in random_ids(n, plen, 32000, seed=n * 1000 + plen).tolist()]

        def run(k: int) -> float:
            t = time.perf_counter()
            llm.generate(prompts, openseek.SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
            return time.perf_counter() - t

        run(2)
        t1, tn = min(run(1) for _ in range(2)), min(run(33) for _ in range(2))
        out[f"decode {dtype_name} {n}x{plen} tok/s"] = n * 32 / (tn - t1)
    return out


def probe_train_step(dtype_name: str, preset: str = "small", repeats: int = 5) -> dict[str, float]:
    """Median seconds of one openseek training step (forward, backward, fused AdamW) on a preset's shape."""
    import torch

    import openseek
    from openseek.train.config import train_preset

    try:  # the layout after the split of train/loop.py
        from openseek.train.step import init_weights, lm_loss
    except ImportError:
        from openseek.train.loop import init_weights, lm_loss

    cfg = train_preset(preset)
    mcfg = cfg.model_config()
    model = openseek.Transformer(mcfg)
    init_weights(model, 0.02, 0)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = getattr(torch, dtype_name)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad()
        lm_loss(model, x[:, :-1], x[:, 1:], dtype).backward()
        opt.step()
        return time.perf_counter() - t

    step()
    return {f"train step {preset} {dtype_name} s": statistics.median(step() for _ in range(repeats))}


PROBES = {"decode": lambda: {**probe_decode("float32"), **probe_decode("bfloat16")},
          "decode_bf16": lambda: probe_decode("bfloat16"),
          "decode_bf16_batched": lambda: probe_decode("bfloat16", ((16, 512),)),
          "train_step": lambda: {**probe_train_step("bfloat16"), **probe_train_step("float32")}}


# ---- the driver ---------------------------------------------------------------------------------------------
def checkout(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    return where


def run_probe(tree: Path, probe: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{BENCH}"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", probe], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"probe {probe} failed in {tree}:\n{done.stderr[-3000:]}")
    line = done.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (item.split("=") for item in line.split(";"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", nargs="?")
    p.add_argument("new", nargs="?", default=None, help="default: the working tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES))
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(";".join(f"{k}={v}" for k, v in PROBES[args.probe]().items()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": checkout(args.old, Path(tmp) / "old"),
                 "new": checkout(args.new, Path(tmp) / "new") if args.new else ROOT}
        try:
            results: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
            for r in range(args.rounds):
                for probe in args.probes:
                    for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        for k, v in run_probe(trees[side], probe).items():
                            results[side].setdefault(k, []).append(v)
                            print(f"round {r + 1} {side}: {k} = {v:.3f}", flush=True)
        finally:
            for side, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n{args.old} (old) against {args.new or 'the working tree'} (new), {args.rounds} alternating rounds:\n")
    print("| measure | old runs | new runs | new / old (medians) |")
    print("|---|---|---|---:|")
    for k, old in results["old"].items():
        new = results["new"][k]
        runs = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
        print(f"| {k} | {runs(old)} | {runs(new)} | {statistics.median(new) / statistics.median(old):.3f} |")


if __name__ == "__main__":
    main()
