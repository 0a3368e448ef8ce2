"""The ablation's report from its saved runs (OUT/runs/*.json): seed statistics, paired differences and verdicts,
the tables, DOCS/ablation.md and DOCS/ablation.png. bench/ablation.py trains the runs and calls render()."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ablation import RECIPE_LR_FROM, Run, best_lrs, edge_runs, final_runs, load_runs, sweep_runs
from ablation_models import VARIANTS, Setting, model_fields
from common import machine_line, markdown_table

PAPER_TOKENS = "10^11-10^12"  # what the papers' ablation models train on (DeepSeekMoE's 2B model: 100B tokens)


@dataclass(frozen=True, slots=True)
class Claim:
    text: str
    source: str
    baseline: str  # variant keys
    variant: str
    metric: str  # a run record's field; lower is better
    paper_sign: int  # the sign of variant - baseline the paper reports; 0: the paper claims no real difference
    caveat: str = ""


CLAIMS = [
    Claim("MLA beats MHA, caching far less", "DeepSeek-V2, appendix D.2", "mha", "mla", "bpb", -1,
          "MLA normalises its latent c_kv (an RMSNorm) where MHA's keys and values have no norm; and a one-seed "
          "check at 3x the steps (bench/results/ablation.txt) leaves a small fraction of the gap: most of it is "
          "faster early learning, so the verdict holds for these short runs only"),
    Claim("DeepSeekMoE beats GShard top-2 at equal total and activated parameters and FLOPs",
          "Dai et al. 2024 (DeepSeekMoE)", "gshard", "deepseekmoe", "bpb", -1,
          "GShard here keeps V2's router (no top-2 renormalisation, capacity or random second expert)"),
    Claim("the bias update reaches a lower loss than the balance loss", "DeepSeek-V3 §4.5.2", "v3-loss", "v3-bias",
          "bpb", -1, "the expert loss is V2's formula on the V3 router's sigmoid scores (P_i not a distribution)"),
    Claim("the bias update balances the batch better (MaxVio_batch)", "Wang et al. 2024 (aux-loss-free balancing)",
          "v3-loss", "v3-bias", "maxvio_batch", -1,
          "the bias moves by at most gamma = 0.001 a step, so a short run corrects only part of the imbalance: "
          "compare both with the softmax router's MaxVio in the results table"),
    Claim("device-limited routing loses little", "DeepSeek-V2 §2.2.2 (M = 3 of 8 devices)", "deepseekmoe",
          "limited", "bpb", 0, "here M = 2 of 5 devices"),
    Claim("token dropping at capacity 1.0 loses little", "DeepSeek-V2 §2.2.4", "deepseekmoe", "dropping", "bpb", 0,
          "tokens are dropped in training only; validation routes every token"),
]
STUDIES = {"MLA against MHA (dense FFN)": ("mha", "mla"), "DeepSeekMoE against GShard": ("gshard", "deepseekmoe"),
           "balance loss against the V3 bias update": ("v3-loss", "v3-bias"),
           "device-limited routing and token dropping": ("deepseekmoe", "limited", "dropping")}


def verdict(diffs: list[float], paper_sign: int) -> str:
    """Reproduced only when every paired difference has the paper's sign and |mean| > 2 standard errors; contradicted
    when all have the other sign as clearly; else not settled. A claim of no difference holds while none resolves."""
    if len(diffs) < 2:
        return "too few seeds"
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    signs = {math.copysign(1, d) for d in diffs if d != 0}
    resolved = len(signs) == 1 and len([d for d in diffs if d != 0]) == len(diffs) and abs(mean) > 2 * se
    if paper_sign == 0:
        return f"resolved: {'worse' if mean > 0 else 'better'} by {abs(mean):.4f}" if resolved else \
            "no difference resolved"
    if not resolved:
        return "not settled at this scale"
    return "reproduced" if signs == {paper_sign} else "contradicted"


def chosen(s: Setting, done: dict[str, dict]) -> dict[str, list[dict]]:
    """Each variant's finished runs at its chosen learning rate, by seed."""
    best = best_lrs(s, done)
    out = {}
    for r in sweep_runs(s) + final_runs(s, best):
        lr = best.get(r.variant, best.get(RECIPE_LR_FROM))
        if r.name in done and r.lr == lr:
            out.setdefault(r.variant, []).append(done[r.name])
    return {k: sorted(v, key=lambda rec: rec["seed"]) for k, v in out.items()}


def missing(s: Setting, done: dict[str, dict]) -> list[str]:
    """Planned runs without a result (the seeds' runs are planned once their sweep has finished)."""
    planned = sweep_runs(s) + final_runs(s, best_lrs(s, done)) + edge_runs(s, done)
    return [r.name for r in planned if r.name not in done]


def mean_std(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (1 seed)"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def paired(claim: Claim, runs: dict[str, list[dict]]) -> list[tuple[int, float]]:
    """(seed, variant - baseline) for every seed both have."""
    base = {r["seed"]: r[claim.metric] for r in runs.get(claim.baseline, [])}
    return [(r["seed"], r[claim.metric] - base[r["seed"]]) for r in runs.get(claim.variant, [])
            if r["seed"] in base and r[claim.metric] is not None and base[r["seed"]] is not None]


def claims_table(runs: dict[str, list[dict]]) -> str:
    rows = []
    for c in CLAIMS:
        pairs = paired(c, runs)
        diffs = [d for _, d in pairs]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        rows.append([c.text, c.source, f"{VARIANTS[c.variant].label} - {VARIANTS[c.baseline].label}", c.metric,
                     ", ".join(f"s{seed}: {d:+.4f}" for seed, d in pairs) or "-",
                     f"{statistics.fmean(diffs):+.4f}" if diffs else "-", f"{se:.4f}",
                     verdict(diffs, c.paper_sign)])
    return markdown_table(["claim", "source", "difference", "metric", "per seed", "mean", "standard error",
                           "verdict"], rows)


def models_table(s: Setting, runs: dict[str, list[dict]]) -> str:
    rows = []
    for k, v in VARIANTS.items():
        if k not in runs:
            continue
        r = runs[k][0]
        rows.append([v.label, v.attention, ffn_label(s, v), f"{r['total'] / 1e6:.3f}M", f"{r['activated'] / 1e6:.3f}M",
                     f"{r['flops_per_token'] / 1e6:.2f}M", r["kv_values"], f"{r['tokens'] / r['total']:.3f}"])
    return markdown_table(["variant", "attention", "FFN", "params", "activated (excl. embedding)",
                           "forward FLOPs / token", "KV values / token / layer", "tokens / param"], rows)


def ffn_label(s: Setting, v) -> str:
    if v.ffn == "dense":
        return f"dense, width {model_fields(s, v)['intermediate_size']}"
    if v.ffn == "gshard":
        return f"top-2 of {s.experts} x {s.ffn // 2}"
    return f"top-6 of {4 * s.experts - 2} x {s.ffn // 8} + 2 shared" + (" (sigmoid, bias)" if v.router == "v3" else "")


def results_table(runs: dict[str, list[dict]]) -> str:
    rows = []
    for k, v in VARIANTS.items():
        rs = runs.get(k, [])
        if not rs:
            continue
        moe = rs[0]["maxvio_batch"] is not None
        rows.append([v.label, f"{rs[0]['lr']:g}", len(rs), mean_std([r["bpb"] for r in rs]),
                     mean_std([r["val_loss"] for r in rs], 3),
                     mean_std([r["maxvio_batch"] for r in rs], 3) if moe else "-",
                     mean_std([r["maxvio_seq"] for r in rs], 3) if moe else "-",
                     f"{statistics.fmean(r['dropped_fraction'] for r in rs):.2%}" if moe else "-",
                     f"{statistics.fmean(r['seconds'] for r in rs) / 60:.1f}"])
    return markdown_table(["variant", "peak lr", "seeds", "val bits/byte", "val nats/token", "MaxVio_batch (val)",
                           "MaxVio_seq (val)", "pairs dropped (train)", "minutes / run"], rows)


def sweep_table(s: Setting, done: dict[str, dict]) -> str:
    best = best_lrs(s, done)
    lrs = sorted({r.lr for r in sweep_runs(s) + edge_runs(s, done)})
    rows = []
    for k, v in VARIANTS.items():
        if not v.swept:
            continue
        cells = []
        for lr in lrs:
            rec = done.get(Run(k, lr, s.seeds[0]).name)
            cells.append("-" if rec is None else f"{rec['bpb']:.4f}" + (" *" if best.get(k) == lr else ""))
        rows.append([v.label, *cells])
    return markdown_table(["variant", *(f"lr {lr:g}" for lr in lrs)], rows)


def log_session(out: Path, start: float, end: float, trained: int, workers: int) -> None:
    """Append one invocation's wall time to OUT/sessions.json (an ablation resumed over several sums them)."""
    path = out / "sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append({"start": start, "end": end, "runs_trained": trained, "workers": workers})
    path.write_text(json.dumps(sessions, indent=1) + "\n")


def wall_minutes(out: Path) -> float:
    path = out / "sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    return sum(x["end"] - x["start"] for x in sessions if x["runs_trained"]) / 60


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (shorter at the start)."""
    return [sum(xs[max(0, i + 1 - window):i + 1]) / min(window, i + 1) for i in range(len(xs))]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Training loss averaged over the seeds (smoothed), one panel per study; validation points at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, keys) in zip(axes.flat, STUDIES.items()):
        lo, hi = math.inf, -math.inf
        for i, k in enumerate(keys):
            rs = runs.get(k, [])
            if not rs:
                continue
            mean = [statistics.fmean(xs) for xs in zip(*(r["train_loss"] for r in rs))]
            smooth = _smooth(mean, max(1, len(mean) // 20))
            ax.plot(range(1, len(smooth) + 1), smooth, color=f"C{i}", lw=1.2,
                    label=f"{VARIANTS[k].label}: {mean_std([r['bpb'] for r in rs])} bits/byte")
            for r in rs:
                ax.plot(r["val_curve"][-1][0], r["val_loss"], "o", color=f"C{i}", ms=4)
            tail = smooth[len(smooth) // 3:]
            lo, hi = min(lo, *tail, *(r["val_loss"] for r in rs)), max(hi, *tail)
        if lo < hi:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi)
        ax.set(title=title, xlabel="step", ylabel="nats / token (line: training, dots: validation)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(s: Setting, out: Path, docs: Path, command: str, corpus: str) -> str:
    """Write DOCS/ablation.md and DOCS/ablation.png from OUT/runs; -> the tables as printed."""
    done = load_runs(out)
    runs = chosen(s, done)
    docs.mkdir(parents=True, exist_ok=True)
    plot(runs, docs / "ablation.png")
    tables = ["## Learning-rate sweep (seed 0, val bits/byte; * = chosen)", "", sweep_table(s, done), "",
              "## Models", "", models_table(s, runs), "",
              "## Results at each variant's chosen learning rate", "", results_table(runs), "",
              "## Claims (paired by seed: same init seed and data order)", "", claims_table(runs), ""]
    lost = missing(s, done)
    text = ["# Ablation: MLA against MHA, DeepSeekMoE against GShard, the MoE recipe", "",
            *setting_text(s, out, done, command, corpus, lost), "", *tables,
            "![training loss of each variant, mean over seeds; validation loss per seed](ablation.png)", "",
            "## Discussion", "", *discussion(s, runs, done), ""]
    (docs / "ablation.md").write_text("\n".join(text))
    return "\n".join(tables) + f"\nwrote {docs / 'ablation.md'} and {docs / 'ablation.png'}" + \
        (f"\nmissing runs: {', '.join(lost)}" if lost else "")


def setting_text(s: Setting, out: Path, done: dict[str, dict], command: str, corpus: str,
                 lost: list[str]) -> list[str]:
    tokens = s.steps * s.batch * s.seq_len
    minutes = sum(r["seconds"] for r in done.values()) / 60
    val = next(iter(done.values()), {})
    mha, mla = 2 * s.heads * s.head_dim, s.latent + s.head_dim // 2
    ratios = [r["tokens"] / r["total"] for r in done.values()] or [math.nan]
    per_param = f"{min(ratios):.2f}-{max(ratios):.2f}"
    lines = [
        f"Regenerate this file and `ablation.png` ({len(done)} runs, {minutes:.0f} minutes of training summed over "
        f"runs, {wall_minutes(out):.0f} minutes of wall time on 2 single-threaded worker processes; wall-clock "
        f"times on a shared machine, which include other users' load and any pause of the workers):", "",
        "```", command, "```", "",
        f"Every run: hidden {s.hidden}, {s.layers} layers, {s.heads} heads of d_h = {s.head_dim}, {s.steps} steps x "
        f"{s.batch} x {s.seq_len} = {tokens / 1e6:.2f}M training tokens of {corpus}, byte-level BPE of vocabulary "
        f"{s.vocab}; the `small` preset's AdamW (0.9, 0.95, weight decay 0.1, clip 1.0), {max(1, s.steps // 10)} "
        f"warm-up steps and V2's step decay (x0.316 at 60% and 90%); float32 on the CPU. A run's seed sets its "
        f"initialisation and its data order, so seed k of two variants sees the same batches in the same order. "
        f"Validation covers the whole held-out split ({val.get('val_tokens', '?')} tokens, "
        f"{val.get('val_bytes', '?')} bytes) after the last step; bits per byte do not depend on the tokenizer.", "",
        f"**Token budget.** {tokens / 1e6:.2f}M tokens per run, {per_param} tokens per parameter (table below), "
        f"against the {PAPER_TOKENS} tokens the papers' ablation models train on: {math.log10(1e11 / tokens):.1f} "
        f"to {math.log10(1e12 / tokens):.1f} orders of magnitude fewer. These runs compare how fast the variants "
        f"learn at the start of training, not where they end.", "",
        f"**Procedure.** MHA, MLA, GShard and DeepSeekMoE each train at seed 0 at peak lr "
        f"{' / '.join(f'{s.lr * f:g}' for f in s.lr_factors)}; each keeps the lr of least validation loss and adds "
        f"seeds {', '.join(map(str, s.seeds[1:]))}. The recipe variants (all DeepSeekMoE models) train at "
        f"DeepSeekMoE's chosen lr, seeds {', '.join(map(str, s.seeds))}. Where a variant's best lies at the edge "
        f"of the sweep, one more seed-0 run one step (x2) beyond checks it: reported, not used to choose (the plan "
        f"was fixed before it ran). A claim is *reproduced* only when the "
        f"difference has the paper's sign for every seed and its mean exceeds two standard errors (sample standard "
        f"deviation of the paired differences / sqrt(seeds)); *contradicted* when the same holds with the other "
        f"sign; otherwise *not settled at this scale*.", "",
        f"**Shapes.** MHA caches 2 H d_h = {mha} values per token per layer; MLA caches d_c + d_R = {s.latent} + "
        f"{s.head_dim // 2} = {mla}, {mha / mla:.2f}x fewer (no query compression; d_R = d_h / 2). MLA has fewer "
        f"attention weights than MHA here, so its dense FFN is widened to even out the activated parameters. The MoE "
        f"models put MLA attention and a dense FFN of width {s.ffn} in layer 0 and MoE in the other "
        f"{s.layers - 1} (V2's first_k_dense_replace = 1). GShard: {s.experts} experts of width {s.ffn // 2}, top-2. "
        f"DeepSeekMoE: each of those cut in 4 (width {s.ffn // 8}) and 2 isolated as shared: {4 * s.experts - 2} "
        f"routed, top-6, + 2 shared, so total parameters, activated parameters and expert FLOPs per token are equal "
        f"(its larger router adds {(3 * s.experts - 2) * s.hidden * (s.layers - 1)} weights, counted in the "
        f"table). Both: V2's softmax router without renormalisation, the expert balance loss alone (alpha1 = "
        f"0.003), no device limit, no dropping.", "",
        "**Recipe variants** (DeepSeekMoE's shape). Balance: V3's router (sigmoid scores, top-6 renormalised, a "
        "selection bias) with the expert balance loss (alpha1 = 0.003, bias fixed at 0) against the bias update "
        "(gamma = 0.001 after every step, V3's sequence-wise loss at alpha = 0.0001, no expert loss). MaxVio = max_i "
        "load_i / mean_i load_i - 1 over the experts' token counts (Wang et al. 2024), over each whole validation "
        "batch (MaxVio_batch) and each sequence (MaxVio_seq, averaged), averaged over batches and MoE layers. "
        f"Routing: the {4 * s.experts - 2} experts on 5 devices, each token's top-6 from at most 2 of them (V2: M = "
        "3 of D = 8), against no limit; and device-level token dropping at capacity factor 1.0 over the same 5 "
        "devices (10% of sequences exempt; never in validation), against none.",
        "", f"Machine (the load average is at rendering time): {machine_line()}."]
    if lost:
        lines += ["", f"**Missing runs** (not finished when this was rendered): {', '.join(lost)}."]
    return lines


def edge_notes(s: Setting, done: dict[str, dict]) -> list[str]:
    """Where a sweep's best lies at its edge: what the check one step beyond found."""
    best, notes = best_lrs(s, done), []
    for r in edge_runs(s, done):
        at = done[Run(r.variant, best[r.variant], r.seed).name]["bpb"]
        label = f"{VARIANTS[r.variant].label}'s best lr {best[r.variant]:g} lies at the sweep's edge"
        if r.name not in done:
            notes.append(f"- **Learning rate.** {label}; the check at lr {r.lr:g} has not run.")
            continue
        beyond = done[r.name]["bpb"]
        found = (f"lr {r.lr:g} did better still at seed 0 ({beyond:.4f} against {at:.4f} bits/byte), so "
                 f"{VARIANTS[r.variant].label} is under-tuned here and its seeds ran at {best[r.variant]:g}"
                 if beyond < at else f"lr {r.lr:g} did worse at seed 0 ({beyond:.4f} against {at:.4f} bits/byte)")
        notes.append(f"- **Learning rate.** {label}; {found}.")
    return notes


def discussion(s: Setting, runs: dict[str, list[dict]], done: dict[str, dict]) -> list[str]:
    """One bullet per claim, in the verdict's words and the measured numbers."""
    out = []
    for c in CLAIMS:
        diffs = [d for _, d in paired(c, runs)]
        if not diffs:
            out.append(f"- **{c.text}** ({c.source}): no paired runs yet.")
            continue
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        out.append(f"- **{c.text}** ({c.source}): {VARIANTS[c.variant].label} minus {VARIANTS[c.baseline].label}, "
                   f"{c.metric} {statistics.fmean(diffs):+.4f} (standard error {se:.4f}, {len(diffs)} seeds): "
                   f"{verdict(diffs, c.paper_sign)}." + (f" Caveat: {c.caveat}." if c.caveat else ""))
    out += edge_notes(s, done)
    out.append(f"- **Scale.** At {s.steps * s.batch * s.seq_len / 1e6:.2f}M tokens a verdict here says how the "
               "variants start, not how they end: a claim not settled here may well hold at the papers' budgets, "
               "and one reproduced here need not. Minutes per run are CPU float32 times of this implementation "
               "(routed experts in a per-expert loop, two runs sharing 2 cores) and say nothing about the "
               "architectures' speed on accelerators.")
    return out
