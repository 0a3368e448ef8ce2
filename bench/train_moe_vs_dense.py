"""DeepSeekMoE against a dense FFN of the same activated size, trained on the same tokens; and one training
step of openseek against transformers' DeepseekV2ForCausalLM (same config, batch and data).

    python bench/train_moe_vs_dense.py [--steps 300] [--out /tmp/openseek-bench/train] [--step-only]
                                       [--step-presets small demo]

Both runs use the `small` preset's attention, tokenizer, data order and schedule; only the FFN differs. The
step timing runs forward + backward + AdamW on identical weights and batches, openseek and transformers
alternating, in bfloat16 autocast and in float32, for the `small` preset and for `demo` (the bundled model's
finer-grained MoE: 32 experts, 4 active), and checks that their losses agree first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import BENCH_DIR, machine_line, markdown_table

from openseek.summary import count_parameters
from openseek.train.config import train_preset
from openseek.train.run import train


def dense_twin(moe: dict) -> dict:
    """The same model with every FFN dense, as wide as the MoE layers' activated experts (shared + top-k)."""
    width = (moe["n_shared_experts"] + moe["num_experts_per_tok"]) * moe["moe_intermediate_size"]
    return {**moe, "n_routed_experts": None, "intermediate_size": width, "first_k_dense_replace": 0}


def run(name: str, cfg, out: Path) -> dict:
    t0 = time.perf_counter()
    train(cfg, out / name, progress=False)
    seconds = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["kind"] == "val"][-1]
    tps = [r["tokens_per_s"] for r in recs if r["kind"] == "train"]
    counts = count_parameters(cfg.model_config())
    return {"name": name, "total": counts.total, "activated": counts.activated_excl_embedding,
            "val_loss": val["loss"], "bpb": val.get("bpb", val.get("bpb_estimate")), "seconds": seconds,
            "tokens_per_s": sorted(tps)[len(tps) // 2]}


def step_timing(cfg, repeats: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """Median seconds of one training step (fwd + bwd + AdamW) for openseek and transformers, and the loss gap.

    Each side computes its loss its own way: openseek's training loss (the head fused with cross-entropy),
    transformers' logits then F.cross_entropy in float32 (as its `labels=` path does). bfloat16 is autocast
    on both sides.
    """
    import tempfile

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import openseek
    from openseek.train.step import init_weights, lm_loss

    mcfg = cfg.model_config()
    mcfg.bos_token_id, mcfg.eos_token_id = cfg.vocab_size - 2, cfg.vocab_size - 1
    model = openseek.Transformer(mcfg)
    init_weights(model, 0.02, 0)
    with tempfile.TemporaryDirectory() as d:
        openseek.save_pretrained(model, d)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.train()
    ref.train()
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1], x[:, 1:]
    # fused AdamW on both sides: openseek's training optimizer, and the HF Trainer's default for torch >= 2.8
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (model, ref)]

    def ours() -> float:
        opts[0].zero_grad()
        loss = lm_loss(model, inp, tgt, dtype)
        loss.backward()
        opts[0].step()
        return loss.item()

    def theirs() -> float:
        opts[1].zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = ref(inp).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        opts[1].step()
        return loss.item()

    gap = abs(ours() - theirs())  # the first step runs on identical weights
    times = {ours: [], theirs: []}
    for _ in range(repeats):
        for fn in (ours, theirs):
            t = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(times[ours]), med(times[theirs]), gap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(BENCH_DIR / "train"))
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--step-presets", nargs="+", default=["small", "demo"],
                   help="presets whose training step is timed against transformers")
    p.add_argument("--step-only", action="store_true", help="time the training step only; skip the two runs")
    args = p.parse_args()
    out = Path(args.out)
    print(machine_line())
    warmup = min(50, args.steps // 10)
    moe_cfg = train_preset("small", steps=args.steps, eval_every=args.steps, save_every=args.steps, warmup=warmup)
    dense_cfg = train_preset("small", steps=args.steps, eval_every=args.steps, save_every=args.steps, warmup=warmup,
                             model=dense_twin(moe_cfg.model), alpha1=0.0, alpha2=0.0, alpha3=0.0, n_devices=1,
                             device_limit=1)
    rows = []
    for preset in args.step_presets:
        cfg = train_preset(preset)
        for dtype in (torch.bfloat16, torch.float32):
            ours_s, theirs_s, gap = step_timing(cfg, args.step_repeats, dtype)
            rows.append([preset, f"{cfg.batch_size} x {cfg.seq_len}", str(dtype).removeprefix("torch."),
                         f"{theirs_s:.3f}", f"{ours_s:.3f}", f"{theirs_s / ours_s:.2f}x", f"{gap:.1e}"])
    print("\none training step (forward, backward, AdamW), same weights and batch:")
    print(markdown_table(["preset", "batch", "precision", "transformers s/step", "openseek s/step", "speed-up",
                          "loss gap, step 1"], rows))
    if args.step_only:
        return
    rows = []
    for name, cfg in (("DeepSeekMoE (fine-grained + shared)", moe_cfg), ("dense FFN, same activated size", dense_cfg)):
        r = run(name.split()[0].lower(), cfg, out)
        rows.append([name, f"{r['total'] / 1e6:.2f}M", f"{r['activated'] / 1e6:.2f}M", f"{r['val_loss']:.3f}",
                     f"{r['bpb']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['seconds'] / 60:.1f}"])
    print(f"\n{args.steps} steps x {moe_cfg.batch_size} x {moe_cfg.seq_len} tokens on the Python standard library:")
    print(markdown_table(["model", "params", "activated (excl. embedding)", "val loss (nats/token)",
                          "val bits/byte", "train tokens/s", "minutes"], rows))


if __name__ == "__main__":
    main()
