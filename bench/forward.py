"""Prefill of openseek (the engine's paged forward, inference kernels) against transformers' forward without a
KV cache, on the same checkpoint and input ids.

    python bench/forward.py [--shapes 1x128,1x512,4x256] [--repeats 5] [--threads N] [--dtype float32]

Checks the logits before timing anything: openseek's dense forward against transformers', and the paged prefill
against the dense forward on the same (inference) kernels. Not the paged prefill against transformers directly:
the grouped experts sum in another order than transformers' loop, and on a random model a router near-tie (two
experts' scores 1e-8 apart) can then route one token differently. Then it prints a markdown table. The two models
are timed in turn within each repeat, so load from other processes on a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from common import (BENCH_CHECKPOINT, STATS, machine_line, make_bench_checkpoint, markdown_table, parse_shapes,
                    peak_rss_gib, random_ids, time_interleaved)

import openseek
from openseek.model import ops
from openseek.model.batch import ForwardBatch

# Largest max-abs logit difference accepted per dtype: float32 agrees to rounding; in bfloat16 the two
# implementations round at different points (transformers also runs its router in bfloat16).
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(BENCH_CHECKPOINT), help="checkpoint folder; built there if missing")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("1x128,1x512,4x256"),
                   help="comma-separated BATCHxSEQ prefill shapes")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape and model")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--stat", choices=STATS, default="median", help="which of the timed runs the table reports")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--dtype", choices=list(TOLERANCE), default="float32", help="weights and activations")
    p.add_argument("--tol", type=float, help="largest max-abs logit difference accepted (default: by dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of a newly built checkpoint and of the input ids")
    return p.parse_args()


def paged_prefill(model: openseek.Transformer, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Logits (B, S, V) of each row of ids (B, S) prefilled as a sequence of its own into a fresh latent cache."""
    B, S = ids.shape
    P = math.ceil(S / block_size)
    tables = torch.arange(B * P).view(B, P)  # (B, P)
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :S]  # (B, S)
    batch = ForwardBatch(positions=torch.arange(S).repeat(B), slot_mapping=slots.flatten(), block_tables=tables,
                         context_lens=[S] * B, query_lens=[S] * B, num_decodes=0, block_size=block_size)
    cache = torch.zeros(model.config.num_hidden_layers, B * P * block_size, model.config.kv_cache_dim,
                        dtype=model.dtype)
    return model.logits(model.hidden_states_paged(ids.flatten(), batch, cache)).view(B, S, -1)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tol = TOLERANCE[args.dtype] if args.tol is None else args.tol
    dtype = getattr(torch, args.dtype)
    make_bench_checkpoint(args.path, seed=args.seed)

    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    ours = openseek.load_pretrained(args.path, dtype=dtype)
    ours.absorb_weights()
    t1 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).eval()
    t2 = time.perf_counter()
    print(f"loaded openseek in {t1 - t0:.1f} s, transformers in {t2 - t1:.1f} s "
          f"(attention {ref.config._attn_implementation}, experts {ref.config._experts_implementation})")
    print(machine_line())

    def run_ref(ids: torch.Tensor) -> torch.Tensor:
        return ref(input_ids=ids, use_cache=False).logits

    rows = []
    with torch.inference_mode():
        for b, s in args.shapes:
            ids = random_ids(b, s, ours.config.vocab_size, seed=args.seed)
            diffs = {"openseek dense - transformers": (ours(ids).float() - run_ref(ids).float()),
                     "openseek paged - dense": (paged_prefill(ours, ids).float()
                                                - ours(ids, kernels=ops.INFERENCE).float())}
            for name, d in diffs.items():
                diff = d.abs().max().item()
                print(f"{b}x{s}: max |logits of {name}| = {diff:.2e}")
                if not diff <= tol:  # written so that NaN fails too
                    raise SystemExit(f"{b}x{s}: {name} differ by {diff:.3e} > tol {tol:g}; not timing a wrong model")
            t = time_interleaved({"tf": lambda: run_ref(ids), "os": lambda: paged_prefill(ours, ids)}, args.repeats,
                                 args.warmup)
            t_ref, t_ours = t["tf"].stat_s(args.stat), t["os"].stat_s(args.stat)
            rows.append([f"{b}x{s}", f"{1e3 * t_ref:.1f}", f"{1e3 * t_ours:.1f}", f"{b * s / t_ref:.0f}",
                         f"{b * s / t_ours:.0f}", f"{t_ref / t_ours:.2f}"])
    print()
    print(markdown_table(["shape (BxS)", "transformers ms", "openseek ms", "transformers tok/s",
                          "openseek tok/s", "ratio (tf / os)"], rows))
    print(f"\n{args.dtype}, {args.stat} of {args.repeats} runs after {args.warmup} warm-up; "
          f"peak RSS {peak_rss_gib():.1f} GiB; {machine_line()}")


if __name__ == "__main__":
    main()
