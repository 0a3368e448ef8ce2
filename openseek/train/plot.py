"""`openseek plot OUT`: loss curves and a per-layer expert-load heat map from OUT/metrics.jsonl (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from .grpo_plot import plot_grpo


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from OUT/metrics.jsonl."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {out}: run `openseek train --out {out}` first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "val"]


def plot(out: str | Path) -> list[Path]:
    """Write OUT/loss.png and OUT/expert_load.png (and OUT/grpo.png for a GRPO run); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    train, val = read_metrics(out)
    if not train:
        raise ValueError(f"{out}/metrics.jsonl has no training records")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train LM loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation LM loss")
    ax.set(xlabel="step", ylabel="nats / token", title="language-model loss")
    ax.legend()
    for key in sorted({k for r in train for k in r.get("aux", {})}):
        bx.plot([r["step"] for r in train], [r["aux"].get(key, float("nan")) for r in train], label=key, lw=1)
    bx.set(xlabel="step", title="balance losses (apart from the LM loss)")
    if bx.lines:
        bx.legend()
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    with_moe = [r for r in train if r.get("moe")]
    if with_moe:
        layers = [m["layer"] for m in with_moe[0]["moe"]]
        grid = [[m["max_over_mean"] for m in r["moe"]] for r in with_moe]  # (steps, layers)
        fig, ax = plt.subplots(figsize=(10, 0.5 * len(layers) + 2))
        im = ax.imshow(list(map(list, zip(*grid))), aspect="auto", cmap="magma", interpolation="nearest",
                       extent=(with_moe[0]["step"], with_moe[-1]["step"], len(layers) - 0.5, -0.5))
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax.set(xlabel="step", title="expert load: max / mean tokens per expert (1 = perfectly balanced)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if any("reward" in r for r in train):
        paths.append(plot_grpo(out))
    return paths
