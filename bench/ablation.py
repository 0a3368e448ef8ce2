"""DeepSeek-V2's architecture claims at small scale: MLA against MHA/GQA/MQA, DeepSeekMoE against GShard and dense.

    python bench/ablation.py [--steps 300] [--out /tmp/openseek-bench/ablation] [--docs docs]
    python bench/ablation.py --quick    # a tiny model on the stdlib's json package; writes into --out only

Six runs on one tokenizer, one packed corpus, one data order and the `small` preset's optimiser and schedule:
MHA, GQA, MQA and MLA, each with a dense SwiGLU FFN whose width evens out the activated parameters, and dense,
GShard top-2 and DeepSeekMoE FFNs, each under MLA (the MLA + dense run belongs to both tables). Prints a markdown
table per ablation and writes DOCS/ablation.md, DOCS/ablation.png and OUT/results.json.

Shapes: B batch, S tokens, D model dim, H query heads, G key/value heads, d head dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import BENCH_DIR, machine_line, markdown_table

from openseek.model import Transformer
from openseek.model.layers import apply_rope
from openseek.model.mla import MLA
from openseek.model.moe import MoE
from openseek.summary import CACHE_DTYPE_BYTES
from openseek.train.config import TRAIN_PRESETS, TrainConfig, train_preset
from openseek.train.data import TokenLoader
from openseek.train.step import build_optimizer, build_recipe, init_weights, lr_at, train_step
from openseek.train.run import Prepared, prepare_data, validation

TABLES = {"attention": "attention (dense SwiGLU FFN)", "ffn": "FFN (MLA attention)"}
KV_DTYPE = "bf16"


@dataclass(slots=True)
class Setting:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    head_dim: int = 64  # d_h
    ffn: int = 768  # I: the MLA run's dense width, and every MoE run's activated width
    seq_len: int = 256
    batch: int = 16
    steps: int = 300
    vocab: int = 4096


QUICK = Setting(hidden=64, layers=2, heads=4, head_dim=16, ffn=192, seq_len=64, batch=8, steps=20, vocab=512)


@dataclass(slots=True)
class Variant:
    name: str
    tables: tuple[str, ...]
    kv_heads: int | None  # G of MHA/GQA/MQA; None: MLA
    ffn: str  # "dense", "gshard" or "deepseekmoe"


def variants(s: Setting) -> list[Variant]:
    return [Variant("MHA", ("attention",), s.heads, "dense"), Variant("GQA", ("attention",), s.heads // 2, "dense"),
            Variant("MQA", ("attention",), 1, "dense"), Variant("MLA", ("attention", "ffn"), None, "dense"),
            Variant("GShard", ("ffn",), None, "gshard"), Variant("DeepSeekMoE", ("ffn",), None, "deepseekmoe")]


class GQA(nn.Module):
    """Grouped-query attention: G key/value heads, each shared by H/G query heads; MHA at G = H, MQA at G = 1.

    Training only (no cache). RoPE rotates the whole head dim; the model's freqs_cis is sized for MLA's d_R.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must be >= 1 and divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, batch: object = None,
                cache: torch.Tensor | None = None, kernels: object = None) -> torch.Tensor:
        """Causal self-attention over x (B, S, D) at positions 0 .. S-1 (its own nn.Linear and SDPA: no kernels)."""
        if batch is not None or cache is not None:
            raise ValueError("this GQA is for training: it has no paged-cache path")
        S = x.shape[1]
        angles = torch.arange(S, device=x.device, dtype=torch.float32)[None, :, None] * self.inv_freq  # (1, S, d/2)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (1, S, d/2) complex
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, -1)), freqs_cis)  # (B, S, H, d)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv_heads, -1)), freqs_cis)  # (B, S, G, d)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, -1))  # (B, S, G, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)  # (B, H, S, d)
        return self.wo(o.transpose(1, 2).flatten(2))  # (B, S, D)


def kv_values(attn: nn.Module) -> int:
    """Values cached per token per layer: K and V of every KV head, or MLA's latent c_kv plus the shared k_pe."""
    if isinstance(attn, GQA):
        return 2 * attn.n_kv_heads * attn.head_dim
    return attn.kv_lora_rank + attn.rope_dim


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model: Transformer) -> tuple[int, int]:
    """(total, activated excluding the embedding): top-k of each layer's E routed experts count (summary.py's rule)."""
    total = _numel(model)
    activated = total - model.embed.weight.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            E, K = m.gate.weight.shape[0], m.gate.top_k
            activated -= _numel(m.experts) * (E - K) // E
    return total, activated


def model_fields(s: Setting, v: Variant) -> dict:
    """ModelConfig fields: MLA with the paper's ratios (d_c = 4 d_h, d_R = d_h / 2, no query compression)."""
    d = s.head_dim
    m = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads, q_lora_rank=None,
             kv_lora_rank=4 * d, qk_nope_head_dim=d, qk_rope_head_dim=d // 2, v_head_dim=d, rope_scaling=None,
             intermediate_size=s.ffn, n_routed_experts=None, first_k_dense_replace=0)
    if v.ffn == "gshard":  # 16 experts of width I/2, top-2, none shared: activated width I
        m.update(n_routed_experts=16, moe_intermediate_size=s.ffn // 2, num_experts_per_tok=2, n_shared_experts=0)
    elif v.ffn == "deepseekmoe":  # each GShard expert cut in 4: 64 of width I/8, top-6 routed + 2 shared = I
        m.update(n_routed_experts=64, moe_intermediate_size=s.ffn // 8, num_experts_per_tok=6, n_shared_experts=2)
    if v.kv_heads is not None:  # fewer attention parameters than MLA: a wider FFN (3 D F weights) makes up for them
        with torch.device("meta"):
            mla = MLA(TrainConfig(model=m, vocab_size=s.vocab).model_config())
            gqa = GQA(s.hidden, s.heads, v.kv_heads, d)
        m["intermediate_size"] = s.ffn + round((_numel(mla) - _numel(gqa)) / (3 * s.hidden))
    return m


def train_config(s: Setting, model: dict, data: list[str]) -> TrainConfig:
    """The `small` preset's optimiser and schedule; the expert balance loss alone (alpha1, one device)."""
    return train_preset("small", model=model, data=data, vocab_size=s.vocab, seq_len=s.seq_len, batch_size=s.batch,
                        steps=s.steps, warmup=min(TRAIN_PRESETS["small"]["warmup"], s.steps // 10),
                        eval_every=max(1, s.steps // 6), alpha1=0.003, alpha2=0.0, alpha3=0.0, n_devices=1,
                        device_limit=1)


@dataclass(slots=True)
class Result:
    name: str
    tables: tuple[str, ...]
    attention: str
    ffn: str
    total: int
    activated: int  # excluding the embedding
    kv_values: int  # per token per layer
    val_loss: float  # nats per token over the whole validation split
    bpb: float
    tokens_per_s: float  # median over steps
    seconds: float
    train_loss: list[float]
    val_curve: list[tuple[int, float]]


def describe(s: Setting, v: Variant, m: dict) -> tuple[str, str]:
    """(attention, FFN) labels of a run for the tables."""
    d = s.head_dim
    attn = {None: f"MLA (d_c {4 * d}, d_R {d // 2})", s.heads: f"MHA ({s.heads} KV heads)", 1: "MQA (1 KV head)"}
    ffn = {"dense": f"dense, width {m['intermediate_size']}", "gshard": f"GShard: top-2 of 16 x {s.ffn // 2}",
           "deepseekmoe": f"DeepSeekMoE: top-6 of 64 x {s.ffn // 8} + 2 shared"}
    return attn.get(v.kv_heads, f"GQA ({v.kv_heads} KV groups)"), ffn[v.ffn]


def train_variant(s: Setting, v: Variant, data: list[str], prepared: Prepared) -> Result:
    """Build, initialise and train one variant; validate over the whole held-out split."""
    m = model_fields(s, v)
    cfg = train_config(s, m, data)
    full_val = dataclasses.replace(cfg, eval_batches=math.ceil(prepared.val.num_tokens / (s.batch * s.seq_len)))
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config())
    if v.kv_heads is not None:
        for block in model.layers:
            block.attn = GQA(s.hidden, s.heads, v.kv_heads, s.head_dim)
    init_weights(model, cfg.init_std, cfg.seed)  # after the swap: every variant drawn alike
    model.train()
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    loader = TokenLoader(prepared.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    train_loss, val_curve, tps = [], [], []
    start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        res = train_step(model, opt, recipe, [next(loader)], cfg, lr_at(cfg, step), torch.float32)
        tps.append(res.tokens / (time.perf_counter() - t0))
        train_loss.append(res.loss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:  # a sample of the split, the whole at the end
            val = validation(model, full_val if step + 1 == cfg.steps else cfg, prepared.val, torch.float32)
            val_curve.append((step + 1, val["loss"]))
    recipe.remove(model)
    total, activated = param_counts(model)
    attn, ffn = describe(s, v, m)
    return Result(v.name, v.tables, attn, ffn, total, activated, kv_values(model.layers[0].attn), val["loss"],
                  val["bpb"], sorted(tps)[len(tps) // 2], time.perf_counter() - start, train_loss, val_curve)


def run_ablation(s: Setting, out: Path, data: list[str]) -> tuple[list[Result], Prepared]:
    """Every variant on the same tokenizer and packed data under OUT/data (data [] = the standard library)."""
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(train_config(s, {}, data), out)
    results = []
    for v in variants(s):
        r = train_variant(s, v, data, prepared)
        print(f"{r.name}: val {r.val_loss:.3f} nats/token, {r.bpb:.3f} bits/byte, {r.seconds / 60:.1f} min", flush=True)
        results.append(r)
    (out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n")
    return results, prepared


HEADERS = ["attention", "FFN", "params", "activated (excl. embedding)", "KV values / token / layer",
           f"KV bytes / token / layer ({KV_DTYPE})", "val loss (nats/token)",
           "val bits/byte", "train tokens/s", "minutes"]


def table(results: list[Result], name: str) -> str:
    rows = [[r.attention, r.ffn, f"{r.total / 1e6:.3f}M", f"{r.activated / 1e6:.3f}M", r.kv_values,
             r.kv_values * CACHE_DTYPE_BYTES[KV_DTYPE], f"{r.val_loss:.3f}", f"{r.bpb:.4f}", f"{r.tokens_per_s:.0f}",
             f"{r.seconds / 60:.1f}"] for r in results if name in r.tables]
    return markdown_table(HEADERS, rows)


def discussion(results: list[Result], s: Setting) -> list[str]:
    """Bullets setting this run's numbers against the papers' claims (lower bits/byte is better)."""
    r = {x.name: x for x in results}
    mha, gqa, mqa, mla, gshard, dsm = (r[k] for k in ("MHA", "GQA", "MQA", "MLA", "GShard", "DeepSeekMoE"))

    def verdict(holds: bool) -> str:
        return "holds in this run" if holds else "is not reproduced in this run"

    def order(table: str, *rs: Result) -> str:
        return "best first: " + ", ".join(f"{label(x, table)} {x.bpb:.4f}" for x in sorted(rs, key=lambda x: x.bpb))

    tokens = s.steps * s.batch * s.seq_len
    return [
        f"- **KV cache** (from the shapes, not measured): MLA caches {mla.kv_values} values per token per layer, "
        f"{mla.kv_values / mha.kv_values:.0%} of MHA's {mha.kv_values}, as many as GQA with "
        f"{mla.kv_values / (2 * s.head_dim):.2f} groups would (the paper's 2.25 for d_c = 4 d_h, d_R = d_h / 2); "
        f"GQA with {gqa.kv_values // (2 * s.head_dim)} groups caches {gqa.kv_values} and MQA {mqa.kv_values}.",
        f"- **MLA against MHA**: {mla.bpb:.4f} against {mha.bpb:.4f} bits/byte ({mla.bpb - mha.bpb:+.4f}). "
        f"DeepSeek-V2 (appendix D.2) reports MLA ahead of MHA at far larger scale; that claim "
        f"{verdict(mla.bpb < mha.bpb)}.",
        f"- **Sharing keys and values**, {order('attention', mha, gqa, mqa)} bits/byte. DeepSeek-V2 (appendix D.1) "
        f"finds quality falling from MHA to GQA to MQA; that order {verdict(mha.bpb <= gqa.bpb <= mqa.bpb)}.",
        f"- **FFN**, {order('ffn', r['MLA'], gshard, dsm)} bits/byte. DeepSeekMoE (Dai et al. 2024) beats GShard "
        f"at equal total and activated parameters: that {verdict(dsm.bpb < gshard.bpb)}. An MoE beats a dense FFN "
        f"of the same activated size: that {verdict(min(dsm.bpb, gshard.bpb) < r['MLA'].bpb)}. The MoE runs hold "
        f"{gshard.total / r['MLA'].total:.1f}x (GShard) and {dsm.total / r['MLA'].total:.1f}x (DeepSeekMoE) the "
        f"dense run's parameters for the same activated count; with {tokens / 1e6:.2f}M tokens each routed expert "
        f"trains on a fraction of them, so an MoE's extra capacity needs a longer run to pay off.",
        "- **Reading the attention table**: the variants differ in KV heads *and*, to even out activated "
        "parameters, in FFN width (MHA/GQA/MQA take the parameters MLA spends on its up-projections into a wider "
        "FFN); at this scale the FFN width can matter more than how keys and values are shared.",
        f"- **How far to trust this**: one seed, {tokens / 1e6:.2f}M training tokens per run and about "
        f"{mla.activated / 1e6:.1f}M activated parameters, orders of magnitude below the papers; run-to-run noise "
        f"is not measured, so gaps of a few thousandths of a bit per byte may not survive another seed. Tokens/s "
        f"are float32 CPU numbers of this implementation (routed experts run in a per-expert loop) and say little "
        f"about the architectures' speed on accelerators.",
        "- **Choices**: MHA/GQA/MQA rotate the whole head with RoPE, MLA only its decoupled d_R dims, each as "
        "defined. GShard keeps DeepSeek-V2's router (softmax top-k, no renormalisation, no capacity limit, no "
        "random second expert) so that expert granularity and shared experts are the only differences from "
        "DeepSeekMoE. Both MoE runs have MoE in every layer and the expert balance loss alone (alpha1 = 0.003).",
    ]


def label(r: Result, table: str) -> str:
    """A run's name in one table: the MLA + dense run is the dense baseline of the FFN table."""
    return "dense" if table == "ffn" and r.name == "MLA" else r.name


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (shorter at the start)."""
    return [sum(xs[max(0, i + 1 - window):i + 1]) / min(window, i + 1) for i in range(len(xs))]


def plot(results: list[Result], path: Path) -> None:
    """Training loss (smoothed) and validation loss per step, one panel per ablation; a run keeps its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lo, hi = math.inf, -math.inf
    for ax, (name, title) in zip(axes, TABLES.items()):
        for i, r in enumerate(results):
            if name not in r.tables:
                continue
            smooth = _smooth(r.train_loss, max(1, len(r.train_loss) // 30))
            steps, val = zip(*r.val_curve)
            ax.plot(range(1, len(smooth) + 1), smooth, color=f"C{i}", lw=1, alpha=0.7)
            ax.plot(steps, val, "o--", color=f"C{i}", ms=4, label=f"{label(r, name)}: {r.bpb:.4f} bits/byte")
            tail = smooth[len(smooth) // 5:]  # past the first drop, where the runs differ
            lo, hi = min(lo, *val, *tail), max(hi, *tail)
        ax.set(xlabel="step", title=title)
        ax.legend()
    axes[0].set(ylabel="nats / token (line: training, dots: validation)", ylim=(lo - 0.05 * (hi - lo), hi))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results: list[Result], s: Setting, prepared: Prepared, docs: Path, command: str,
               corpus: str) -> Path:
    """DOCS/ablation.md (setting, tables, discussion) and DOCS/ablation.png; -> the .md path."""
    docs.mkdir(parents=True, exist_ok=True)
    plot(results, docs / "ablation.png")
    tokens = s.steps * s.batch * s.seq_len
    minutes = sum(r.seconds for r in results) / 60
    text = [
        "# Ablation: MLA against MHA/GQA/MQA, DeepSeekMoE against GShard and dense", "",
        f"Regenerate this file, the tables and `ablation.png` ({minutes:.1f} minutes here):", "",
        "```", command, "```", "",
        f"Every run: hidden {s.hidden}, {s.layers} layers, {s.heads} heads of dim {s.head_dim}, {s.steps} steps x "
        f"{s.batch} x {s.seq_len} = {tokens / 1e6:.2f}M training tokens of {corpus}, byte-level BPE of vocabulary "
        f"{s.vocab}, the same data order; the `small` preset's AdamW, peak lr, warm-up and step schedule; float32, "
        f"seed 0. The final validation covers the whole held-out split ({prepared.val.num_tokens} tokens, "
        f"{prepared.val.num_bytes} bytes); bits per byte do not depend on the tokenizer. Activated parameters leave "
        f"out the input embedding (the output head counts). KV cache: values per token per layer, and bytes at "
        f"{KV_DTYPE}; a token's whole cache is {s.layers} times that. Measured on: {machine_line()}.", "",
        f"## {TABLES['attention']}", "",
        f"The dense FFN of MHA/GQA/MQA is widened from {s.ffn} so their activated parameters match MLA's.", "",
        table(results, "attention"), "",
        f"## {TABLES['ffn']}", "",
        f"Activated FFN width {s.ffn} in every run; MoE in every layer.", "",
        table(results, "ffn"), "",
        "![training and validation loss of every run](ablation.png)", "",
        "## Discussion", "", *discussion(results, s), "",
    ]
    path = docs / "ablation.md"
    path.write_text("\n".join(text))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a tiny setting for smoke tests: hidden {QUICK.hidden}, {QUICK.layers} layers, seq "
                        f"{QUICK.seq_len}, {QUICK.steps} steps, on the stdlib's json package unless --data")
    p.add_argument("--steps", type=int, help=f"steps per run (default {Setting().steps}; {QUICK.steps} with --quick)")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {Setting().vocab}; {QUICK.vocab} with "
                                                  "--quick); a small corpus may need less")
    p.add_argument("--data", nargs="+", help="corpus files or folders (default: the Python standard library)")
    p.add_argument("--out", help=f"runs and packed data (default {BENCH_DIR / 'ablation'}, or ablation-quick)")
    p.add_argument("--docs", help="folder for ablation.md and ablation.png (default docs/; --out with --quick)")
    p.add_argument("--from-results", action="store_true", help="no training: rewrite the tables, docs and plot "
                                                                 "from OUT/results.json of an earlier run")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("vocab", args.vocab_size)) if v is not None}
    s = dataclasses.replace(QUICK if args.quick else Setting(), **overrides)
    data = args.data or ([str(Path(sysconfig.get_paths()["stdlib"]) / "json")] if args.quick else [])
    out = Path(args.out or BENCH_DIR / ("ablation-quick" if args.quick else "ablation"))
    docs = Path(args.docs or (out if args.quick else Path(__file__).resolve().parent.parent / "docs"))
    print(machine_line())
    if args.from_results:
        results = [Result(**{**r, "tables": tuple(r["tables"])}) for r in json.loads((out / "results.json").read_text())]
        prepared = prepare_data(train_config(s, {}, data), out)
    else:
        results, prepared = run_ablation(s, out, data)
    for name, title in TABLES.items():
        print(f"\n{title}, {s.steps} steps x {s.batch} x {s.seq_len} tokens:")
        print(table(results, name))
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--from-results"]
    command = shlex.join(["python", "bench/ablation.py", *given])
    corpus = ", ".join(data) if data else "the Python standard library (*.py)"
    print(f"\nwrote {write_docs(results, s, prepared, docs, command, corpus)} and {docs / 'ablation.png'}")


if __name__ == "__main__":
    main()
