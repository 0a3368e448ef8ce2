"""How many 4,096-token sequences fit in one KV-cache budget: openseek's paged latent cache against the
per-head expanded K/V cache of DeepSeek's hub code (`modeling_deepseek.py`, what transformers < 5 ran too),
and against what transformers 5.24's DeepseekV2 actually caches, measured from its DynamicCache.

    python bench/capacity.py [--budget-gib 4] [--seq-len 4096]

openseek's figure is the engine's own allocation (LLMEngine.token_capacity at kv_cache_memory=budget), not a
formula; transformers' is measured from the tensors its cache holds after a prefill.
"""

from __future__ import annotations

import argparse

import torch

from common import BENCH_CHECKPOINT, make_bench_checkpoint, markdown_table, random_ids

import openseek


def transformers_cache_bytes_per_token(path: str, tokens: int = 64) -> int:
    """Bytes per token held by transformers' DynamicCache after a prefill of `tokens` tokens."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(1, tokens, ref.config.vocab_size)
    with torch.inference_mode():
        out = ref(ids, use_cache=True)
    total = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in vars(layer).values()
                if torch.is_tensor(t))
    return total // tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(BENCH_CHECKPOINT))
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    make_bench_checkpoint(args.path)
    budget = int(args.budget_gib * 2**30)
    engine = openseek.LLMEngine.from_pretrained(args.path, openseek.EngineConfig(
        dtype=torch.float32, kv_cache_memory=budget, max_model_len=args.seq_len))
    cfg = engine.model.config
    ours = engine.token_capacity // args.seq_len
    ours_bpt = engine.runner.cache_bytes // engine.token_capacity
    expanded_bpt = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    tf_bpt = transformers_cache_bytes_per_token(args.path)
    rows = [["openseek (paged latent: c_kv + k_pe)", f"{ours_bpt:,}", ours, "1.00x"]]
    for name, bpt in (("hub modeling_deepseek.py / transformers < 5 (expanded K/V)", expanded_bpt),
                      ("transformers 5.24 DynamicCache (measured)", tf_bpt)):
        n = budget // (bpt * args.seq_len)
        rows.append([name, f"{bpt:,}", n, f"{ours / max(n, 1):.2f}x"])
    print(f"cache budget {args.budget_gib:g} GiB, float32, {args.seq_len}-token sequences, "
          f"{cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads")
    print(markdown_table(["cache", "bytes / token", f"{args.seq_len}-token sequences held", "openseek holds"], rows))


if __name__ == "__main__":
    main()
