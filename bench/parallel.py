"""One process with 2 threads against 2 processes with 1 thread each (tensor + expert parallel on gloo), in one run.

    python bench/parallel.py [--path MODEL] [--prompts 8] [--prompt-len 64] [--new-tokens 64] [--no-expert-parallel]

Greedy, the same prompts on both sides; tok/s counts generated tokens over the whole generate call (prefill
included). Communication per step is rank 0's time inside the all-reduces (2 per layer) divided by the forward
steps: it includes the wait for the slower rank, so it bounds the pure transfer time from above. The two runs
must produce the same tokens; the script says so.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import load_average, machine_line, markdown_table, random_ids

import openseek
from openseek import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(openseek.BUNDLED_MODEL), help="checkpoint folder (default: the bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--expert-parallel", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args()


def measure(llm: LLM, prompts: list, params: SamplingParams) -> tuple[list, float, int]:
    """(tokens, seconds, forward steps) of one generate call, after a warm-up call."""
    runner = llm.llm_engine.runner
    steps = [0]
    forward = runner.run

    def counted(batch):
        steps[0] += 1
        return forward(batch)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    llm.reset_prefix_cache()
    runner.run = counted
    if hasattr(runner, "workers"):
        runner.workers.comm_seconds[0] = 0.0
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    runner.run = forward
    return [o.outputs[0].token_ids for o in outs], seconds, steps[0]


def main() -> None:
    args = parse_args()
    cfg = openseek.ModelConfig.from_file(args.path)
    ids = random_ids(args.prompts, args.prompt_len, cfg.vocab_size)
    prompts = [{"prompt_token_ids": row.tolist()} for row in ids]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    generated = args.prompts * args.new_tokens
    common = dict(dtype=args.dtype, max_model_len=args.prompt_len + args.new_tokens + 8)
    print(machine_line(), f"| load average {load_average():.2f}")

    runs = {}
    for threads in (2, 1):  # the second: what one of the 2 processes would do alone
        torch.set_num_threads(threads)
        one = LLM(args.path, **common)
        runs[threads] = measure(one, prompts, params)
        del one
    want, t1, steps1 = runs[2]

    torch.set_num_threads(1)  # rank 0's count; the worker it starts takes the same
    experts = "EP=2" if args.expert_parallel else "expert F split"
    rows, same = [], True
    for name, sizes in ((f"TP=2, {experts}", dict(tensor_parallel_size=2)),
                        (f"DP attention=2, {experts}", dict(data_parallel_size=2))):
        two = LLM(args.path, enable_expert_parallel=args.expert_parallel, **sizes, **common)
        try:
            got, t2, steps2 = measure(two, prompts, params)
            comm = two.llm_engine.runner.workers.comm_seconds[0]
            stats = two.llm_engine.runner.worker_stats()
        finally:
            two.llm_engine.shutdown()
        same = same and got == want
        rows.append([f"2 processes x 1 thread, {name}", f"{generated / t2:.1f}", f"{t2:.2f}", steps2,
                     f"{1000 * comm / max(steps2, 1):.2f} ({comm / t2:.0%})",
                     " / ".join(f"{s['routed_experts'] / 1e6:.1f}" for s in stats)])
    print(f"{args.path}: {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new each, {args.dtype}")
    print(markdown_table(
        ["run", "tok/s", "seconds", "forward steps", "all-reduce ms/step (share of run), rank 0",
         "routed-expert MB per rank"],
        [[f"1 process x {n} thread{'s' * (n > 1)}", f"{generated / t:.1f}", f"{t:.2f}", steps, "-", "-"]
         for n, (_, t, steps) in runs.items()] + rows))
    print(f"same tokens in all runs: {same and runs[1][0] == want}")


if __name__ == "__main__":
    main()
