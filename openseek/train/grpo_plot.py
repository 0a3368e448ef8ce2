"""`openseek plot OUT` of a GRPO run: reward and held-out pass@1 curves, and the policy's KL / entropy, OUT/grpo.png."""

from __future__ import annotations

import json
from pathlib import Path


def plot_grpo(out: Path) -> Path:
    """Write OUT/grpo.png from OUT/metrics.jsonl (matplotlib already set to Agg by the caller); return its path."""
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train" and "reward" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward"] for r in train], lw=1, label="reward (mean of the rollouts)")
    for part in sorted({k for r in train for k in r.get("reward_parts", {})}):
        ax.plot(steps, [r["reward_parts"].get(part, float("nan")) for r in train], lw=1, label=part)
    ax.set(xlabel="step", title="rollout reward")
    ax.legend(fontsize="small")
    for key, label in (("pass@1", "greedy"), ("pass@1_sampled", "one sample at the rollout temperature")):
        bx.plot([r["step"] for r in evals], [100 * r[key] for r in evals], "o-", label=label)
    bx.set(xlabel="step", ylabel="%", title=f"held-out pass@1 ({evals[0]['problems'] if evals else 0} problems)")
    bx.legend(fontsize="small")
    cx.plot(steps, [r["kl"] for r in train], lw=1, label="KL to the reference")
    cx.plot(steps, [r["entropy"] for r in train], lw=1, label="entropy (nats / token)")
    cx.set(xlabel="step", title="policy")
    cx.legend(fontsize="small")
    fig.tight_layout()
    path = out / "grpo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
