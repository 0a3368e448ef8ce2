"""Decode throughput of openseek's engine against transformers' generate, on the same checkpoint and prompts.

    python bench/throughput.py [--scenarios 1x256,16x512] [--new-tokens 64] [--repeats 2] [--dtype bfloat16]

Greedy, no early stop. Decode tokens/s = tokens generated after the first / (time to N tokens - time to 1
token), so prefill is excluded on both sides. Also measures the machine's memory read bandwidth and reports
batch-1 decode as a fraction of the bandwidth bound (bandwidth / bytes of weights and cache read per token).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (BENCH_CHECKPOINT, machine_line, make_bench_checkpoint, markdown_table, parse_shapes,
                    random_ids)

import openseek
from openseek.summary import count_parameters


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(BENCH_CHECKPOINT), help="checkpoint folder; built here if missing")
    p.add_argument("--scenarios", type=parse_shapes, default=parse_shapes("1x256,16x512"),
                   help="comma-separated CONCURRENCYxPROMPT_LEN")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (the fastest is kept)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides' weights")
    return p.parse_args()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s a full-vector reduction streams from memory (the pattern decode's weight reads follow)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    return x.numel() * 4 / best_of(lambda: x.sum(), repeats)


def decode_rate(generate, n_seqs: int, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s: (N - 1) tokens per sequence over time(N tokens) - time(1 token)."""
    t1 = best_of(lambda: generate(1), repeats)
    tn = best_of(lambda: generate(new_tokens), repeats)
    return n_seqs * (new_tokens - 1) / (tn - t1)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    make_bench_checkpoint(args.path)
    print(machine_line())
    dtype = getattr(torch, args.dtype)
    llm = openseek.LLM(args.path, dtype=dtype, max_num_seqs=64, enable_prefix_caching=False,
                       max_model_len=2048, max_num_batched_tokens=4096)
    cfg = llm.llm_engine.model.config
    ref = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).eval()
    vocab = cfg.vocab_size
    rows, batch1 = [], None
    for n, plen in args.scenarios:
        ids = random_ids(n, plen, vocab, seed=n * 1000 + plen)

        def run_ours(k: int) -> list:
            params = openseek.SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": row} for row in ids.tolist()], params)
            assert all(len(o.outputs[0].token_ids) == k for o in outs)
            return outs

        def run_ref(k: int):
            with torch.inference_mode():
                return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)

        ours = decode_rate(run_ours, n, args.new_tokens, args.repeats)
        theirs = decode_rate(run_ref, n, args.new_tokens, args.repeats) if ref is not None else float("nan")
        if ref is not None:
            same = [o.outputs[0].token_ids for o in run_ours(8)] == run_ref(8)[:, plen:].tolist()
            print(f"{n}x{plen}: greedy tokens identical to transformers: {same}")
        rows.append([f"{n} x {plen}", f"{theirs:.1f}", f"{ours:.1f}", f"{ours / theirs:.2f}x"])
        if n == 1:
            batch1 = (ours, plen)
    print()
    print(markdown_table(["sequences x prompt", "transformers tok/s", "openseek tok/s", "ratio"], rows))
    if batch1:
        bandwidth = read_bandwidth()
        counts = count_parameters(cfg)
        context = batch1[1] + args.new_tokens / 2  # average cached tokens read per decode step
        weight_bytes = counts.activated_excl_embedding * dtype.itemsize  # the input embedding is one row
        cache_bytes = context * cfg.num_hidden_layers * cfg.kv_cache_dim * dtype.itemsize  # the cache: model dtype
        bound = bandwidth / (weight_bytes + cache_bytes)
        print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s; bytes per batch-1 decode token: weights "
              f"{weight_bytes / 1e6:.0f} MB + latent cache {cache_bytes / 1e6:.1f} MB -> bound {bound:.1f} tok/s; "
              f"openseek batch-1 decode {batch1[0]:.1f} tok/s = {100 * batch1[0] / bound:.0f}% of the bound")


if __name__ == "__main__":
    main()
