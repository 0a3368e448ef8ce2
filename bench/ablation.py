"""DeepSeek-V2/V3's claims at small scale, each over 3 seeds: MLA against MHA, DeepSeekMoE against GShard, and the
MoE recipe (balance loss against the V3 bias update, device-limited routing, token dropping).

    python bench/ablation.py [--steps 150] [--workers 2] [--out /tmp/openseek-bench/ablation] [--docs docs]
    python bench/ablation.py --from-results    # no training: re-render from OUT/runs
    python bench/ablation.py --quick           # a tiny model on the stdlib's json package; writes into --out only

A run is one variant at one peak learning rate and one seed (the init and the data order; the same data order for a
seed across variants). Each is saved to OUT/runs/<name>.json when it finishes and skipped when that file exists, so
an interrupted ablation resumes. First each learning-rate-swept variant trains at seed 0 at lr x {0.5, 1, 2}; then
seeds 1 and 2 at its best, and the recipe variants at DeepSeekMoE's best. The models and their counts are in
ablation_models.py; ablation_report.py renders the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ablation_models import (QUICK, VARIANTS, Setting, build_model, flops_per_token, kv_values, model_fields,
                             param_counts)
from common import BENCH_DIR, machine_line

from openseek.model import Transformer
from openseek.train.config import TrainConfig, train_preset
from openseek.train.data import IGNORE_INDEX, TokenLoader, bits_per_byte, validation_batches
from openseek.train.run import prepare_data, validation
from openseek.train.step import build_optimizer, build_recipe, evaluate, lr_at, train_step

RECIPE_LR_FROM = "deepseekmoe"
# training order: should time run out, the claims finished first have all their seeds (the MoE runs are the slowest)
PRIORITY = ("gshard", "deepseekmoe", "mha", "mla", "v3-loss", "v3-bias", "limited", "dropping")


@dataclass(frozen=True, slots=True)
class Run:
    variant: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-lr{self.lr:g}-s{self.seed}"


def train_config(s: Setting, data: list[str], model: dict | None = None, run: Run | None = None) -> TrainConfig:
    """The `small` preset's optimiser and step schedule at the run's peak lr and seed, the variant's MoE recipe;
    without a run, the data's config (seed 0: one train/validation split for every run)."""
    recipe = dict(alpha1=0.003, alpha2=0.0, alpha3=0.0, n_devices=1, device_limit=1)
    if run is not None:
        recipe.update({"alpha1": 0.0, **dict(VARIANTS[run.variant].recipe)})
    return train_preset("small", model=model or {}, data=data, vocab_size=s.vocab, seq_len=s.seq_len,
                        batch_size=s.batch, steps=s.steps, warmup=max(1, s.steps // 10), eval_every=s.steps // 4 or 1,
                        eval_batches=4, lr=run.lr if run else s.lr, seed=run.seed if run else 0, **recipe)


def validate_with_load(model: Transformer, recipe, cfg: TrainConfig, ds) -> dict:
    """Loss and bits per byte over the whole validation split; MaxVio of every full batch, averaged over batches and
    MoE layers (per batch, and per sequence)."""
    nats, tokens, vio_batch, vio_seq = 0.0, 0, [], []
    for x, y in validation_batches(ds, cfg.batch_size, cfg.seq_len):
        recipe.reset()
        loss, n = evaluate(model, [(x, y)], torch.float32)
        nats, tokens = nats + loss * n, tokens + n
        layers = recipe.stats().values()
        if layers and bool((y != IGNORE_INDEX).all()):  # the padded tail batch would count its padding's routes
            vio_batch.append(sum(st["maxvio_batch"] for st in layers) / len(layers))
            vio_seq.append(sum(st["maxvio_seq"] for st in layers) / len(layers))
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"val_loss": nats / tokens, "bpb": bits_per_byte(nats, ds.num_bytes), "maxvio_batch": mean(vio_batch),
            "maxvio_seq": mean(vio_seq)}


def train_run(s: Setting, run: Run, data: list[str], out: Path) -> dict:
    """Train one run and validate it over the whole held-out split; -> the record saved as OUT/runs/<name>.json."""
    v = VARIANTS[run.variant]
    cfg = train_config(s, data, model_fields(s, v), run)
    prepared = prepare_data(train_config(s, data), out)
    model = build_model(s, v, cfg)
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    loader = TokenLoader(prepared.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    train_loss, val_curve, dropped, step_seconds = [], [], [], []
    start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        res = train_step(model, opt, recipe, [next(loader)], cfg, lr_at(cfg, step), torch.float32)
        step_seconds.append(time.perf_counter() - t0)
        train_loss.append(res.loss)
        layers = recipe.stats().values()
        dropped.append(sum(st["dropped_fraction"] for st in layers) / len(layers) if layers else 0.0)
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:  # a sample; the whole split at the end
            val_curve.append((step + 1, validation(model, cfg, prepared.val, torch.float32)["loss"]))
    t0 = time.perf_counter()
    final = validate_with_load(model, recipe, cfg, prepared.val)
    val_seconds = time.perf_counter() - t0
    val_curve.append((cfg.steps, final["val_loss"]))
    recipe.remove(model)
    total, activated = param_counts(model)
    return dict(name=run.name, variant=run.variant, lr=run.lr, seed=run.seed, steps=cfg.steps,
                tokens=cfg.steps * cfg.batch_size * cfg.seq_len, total=total, activated=activated,
                flops_per_token=flops_per_token(s, v.attention, activated), kv_values=kv_values(s, v.attention),
                dropped_fraction=sum(dropped) / len(dropped), **final, seconds=time.perf_counter() - start,
                step_seconds=sorted(step_seconds)[len(step_seconds) // 2], val_seconds=val_seconds,
                train_loss=train_loss, val_curve=val_curve, val_tokens=prepared.val.num_targets,
                val_bytes=prepared.val.num_bytes)


def run_path(out: Path, run: Run) -> Path:
    return out / "runs" / f"{run.name}.json"


def _train_and_save(job: tuple[Setting, Run, list[str], Path]) -> str:
    """A worker's task: one run, saved atomically (a half-written file never counts as finished)."""
    s, run, data, out = job
    torch.set_num_threads(1)
    rec = train_run(s, run, data, out)
    path = run_path(out, run)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec) + "\n")
    tmp.replace(path)
    return (f"{run.name}: val {rec['val_loss']:.4f} nats/token, {rec['bpb']:.4f} bits/byte, "
            f"{rec['seconds'] / 60:.1f} min")


def execute(s: Setting, runs: list[Run], data: list[str], out: Path, workers: int) -> int:
    """Train the runs without a saved result, in PRIORITY order, then by seed; -> how many were trained.

    No timeout on a worker: another user may pause it (SIGSTOP) for a while."""
    todo = sorted((r for r in runs if not run_path(out, r).exists()),
                  key=lambda r: (PRIORITY.index(r.variant), r.seed, r.lr))
    for r in runs:
        if r not in todo:
            print(f"{r.name}: saved earlier, skipped", flush=True)
    jobs = [(s, r, data, out) for r in todo]
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            print(_train_and_save(job), flush=True)
    else:  # spawn: a fresh interpreter per worker, no forked torch thread pools
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for line in pool.imap_unordered(_train_and_save, jobs):
                print(line, flush=True)
    return len(jobs)


def load_runs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def sweep_runs(s: Setting) -> list[Run]:
    """Every swept variant at seed s.seeds[0] and each learning rate."""
    return [Run(k, s.lr * f, s.seeds[0]) for k, v in VARIANTS.items() if v.swept for f in s.lr_factors]


def best_lrs(s: Setting, done: dict[str, dict]) -> dict[str, float]:
    """Each swept variant's learning rate of least validation loss, once its whole sweep has finished."""
    best = {}
    for k, v in VARIANTS.items():
        sweep = [done.get(r.name) for r in sweep_runs(s) if r.variant == k]
        if v.swept and all(sweep):
            best[k] = min(sweep, key=lambda rec: rec["val_loss"])["lr"]
    return best


def edge_runs(s: Setting, done: dict[str, dict]) -> list[Run]:
    """A check, not a choice: seed 0 one step (x2) beyond the sweep for each variant whose best lies at its edge."""
    low, high = s.lr * min(s.lr_factors), s.lr * max(s.lr_factors)
    return [Run(k, lr / 2 if lr == low else lr * 2, s.seeds[0]) for k, lr in best_lrs(s, done).items()
            if lr in (low, high)]


def final_runs(s: Setting, best: dict[str, float]) -> list[Run]:
    """The remaining seeds of every swept variant at its best lr; every seed of the recipe variants at DeepSeekMoE's."""
    runs = [Run(k, lr, seed) for k, lr in best.items() for seed in s.seeds[1:]]
    if RECIPE_LR_FROM in best:
        runs += [Run(k, best[RECIPE_LR_FROM], seed) for k, v in VARIANTS.items() if not v.swept for seed in s.seeds]
    return runs


def run_ablation(s: Setting, out: Path, data: list[str], workers: int = 2) -> int:
    """The sweep, the seeds, then the edge checks; every run saved under OUT/runs (data [] = the standard library),
    the setting in OUT/setting.json; -> runs trained."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "setting.json").write_text(json.dumps(dataclasses.asdict(s), indent=1) + "\n")
    prepare_data(train_config(s, data), out)  # once, before the workers: they reuse the packed shards
    trained = execute(s, sweep_runs(s), data, out, workers)
    best = best_lrs(s, load_runs(out))
    print("best learning rates: " + ", ".join(f"{VARIANTS[k].label} {lr:g}" for k, lr in best.items()), flush=True)
    trained += execute(s, final_runs(s, best), data, out, workers)
    return trained + execute(s, edge_runs(s, load_runs(out)), data, out, workers)


def saved_setting(out: Path, default: Setting) -> Setting:
    """The setting OUT's runs were trained in (OUT/setting.json), or `default` for an OUT without one."""
    path = out / "setting.json"
    if not path.exists():
        return default
    fields = json.loads(path.read_text())
    return Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main(argv: list[str] | None = None) -> None:
    import ablation_report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a tiny setting for smoke tests: hidden {QUICK.hidden}, {QUICK.layers} layers, seq "
                        f"{QUICK.seq_len}, {QUICK.steps} steps, on the stdlib's json package unless --data")
    p.add_argument("--steps", type=int, help=f"steps per run (default {Setting().steps}; {QUICK.steps} with --quick)")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {Setting().vocab}; {QUICK.vocab} with "
                                                  "--quick); a small corpus may need less")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each (default 2)")
    p.add_argument("--data", nargs="+", help="corpus files or folders (default: the Python standard library)")
    p.add_argument("--out", help=f"runs and packed data (default {BENCH_DIR / 'ablation'}, or ablation-quick)")
    p.add_argument("--docs", help="folder for ablation.md and ablation.png (default docs/; --out with --quick)")
    p.add_argument("--from-results", action="store_true", help="no training: re-render the tables, docs and plot "
                                                                 "from the runs saved under OUT/runs")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("vocab", args.vocab_size)) if v is not None}
    s = dataclasses.replace(QUICK if args.quick else Setting(), **overrides)
    data = args.data or ([str(Path(sysconfig.get_paths()["stdlib"]) / "json")] if args.quick else [])
    out = Path(args.out or BENCH_DIR / ("ablation-quick" if args.quick else "ablation"))
    docs = Path(args.docs or (out if args.quick else Path(__file__).resolve().parent.parent / "docs"))
    torch.set_num_threads(1)
    print(machine_line(), flush=True)
    if args.from_results:
        s = saved_setting(out, s)
    else:
        start = time.time()
        trained = run_ablation(s, out, data, args.workers)
        ablation_report.log_session(out, start, time.time(), trained, args.workers)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--from-results"]
    command = shlex.join(["python", "bench/ablation.py", *given])
    corpus = ", ".join(data) if data else "the Python standard library (*.py)"
    print(ablation_report.render(s, out, docs, command, corpus))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before the workers spawn: one thread each
    main()
