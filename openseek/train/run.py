"""`openseek train`: data -> model -> steps with metrics, checkpoints and exact resume -> export."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import Transformer
from ..summary import count_parameters
from . import data
from .config import TrainConfig
from .loop import (MetricsLog, build_optimizer, build_recipe, evaluate, export, init_weights, latest_checkpoint,
                   lr_at, measure_peak_flops, rng_state, save_checkpoint, set_rng_state, throughput, train_step)


@dataclass(slots=True)
class Prepared:
    tokenizer_dir: Path
    train: data.PackedDataset
    val: data.PackedDataset


def prepare_data(cfg: TrainConfig, out: Path) -> Prepared:
    """Tokenizer and packed shards under OUT/data; reused when the inputs are unchanged."""
    files = data.corpus_files(cfg.data or None)
    train_files, val_files = data.split_files(files, cfg.val_fraction, cfg.seed)
    tok_dir = out / "data" / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = data.train_tokenizer(train_files, cfg.vocab_size, tok_dir, max_bytes=cfg.max_tokenizer_bytes)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{tok_dir} holds a tokenizer of vocab {tokenizer.vocab_size}, the config asks for "
                         f"{cfg.vocab_size}: use a fresh --out")
    return Prepared(tok_dir, data.pack_tokens(train_files, tokenizer, out / "data" / "train"),
                    data.pack_tokens(val_files, tokenizer, out / "data" / "val"))


def validation(model: Transformer, cfg: TrainConfig, ds: data.PackedDataset, dtype: torch.dtype) -> dict:
    """Mean loss and bits per byte over the first eval_batches batches of the validation split."""
    batches = data.validation_batches(ds, cfg.batch_size // cfg.grad_accum, cfg.seq_len)
    limited = (b for i, b in zip(range(cfg.eval_batches), batches))
    nats, tokens = evaluate(model, limited, dtype)
    full = cfg.eval_batches * (cfg.batch_size // cfg.grad_accum) * cfg.seq_len >= ds.num_tokens
    rec = {"loss": nats, "tokens": tokens}
    if full:  # bits per byte needs the whole split's bytes
        rec["bpb"] = data.bits_per_byte(nats * tokens, ds.num_bytes)
    else:  # estimate from the sampled fraction of the split
        rec["bpb_estimate"] = data.bits_per_byte(nats * ds.num_tokens, ds.num_bytes)
    return rec


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_at: int | None = None,
          progress: bool = True) -> Path | None:
    """Run (or continue) training; returns the exported model folder when the last step is reached."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    prepared = prepare_data(cfg, out)
    model = Transformer(cfg.model_config())
    init_weights(model, cfg.init_std, cfg.seed)
    model.train()
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    loader = data.TokenLoader(prepared.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    step = 0
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out}/checkpoints")
    if ckpt is not None:
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{ckpt} was written with another config; resume with the same flags")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step = state["step"]
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", step)
    dtype = getattr(torch, cfg.dtype)
    counts = count_parameters(model.config)
    flops_per_token = 6 * counts.activated_excl_embedding
    peak = measure_peak_flops(dtype)
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    bar = _progress(progress, step, cfg.steps)
    micro = cfg.batch_size // cfg.grad_accum
    while step < end:
        t0 = time.perf_counter()
        x, y = next(loader)
        batches = list(zip(x.split(micro), y.split(micro)))
        lr = lr_at(cfg, step)
        res = train_step(model, opt, recipe, batches, cfg, lr, dtype)
        step += 1
        rec = {"kind": "train", "step": step, "loss": res.loss, "aux": res.aux, "grad_norm": res.grad_norm,
               "lr": lr, **throughput(res.tokens, time.perf_counter() - t0, flops_per_token, peak),
               "moe": [{"layer": int(name.split(".")[1]), **_rename(s)} for name, s in recipe.stats().items()]}
        if step % cfg.log_every == 0 or step == end:
            log.write(rec)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log.write({"kind": "val", "step": step, **validation(model, cfg, prepared.val, dtype)})
        if step % cfg.save_every == 0 or step == end:
            save_checkpoint(out, step, {"step": step, "config": cfg.to_dict(), "model": model.state_dict(),
                                        "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                                        "rng": rng_state()}, cfg.keep_last)
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.2e}")
    bar.close()
    recipe.remove(model)
    return export(model, prepared.tokenizer_dir, out) if step >= cfg.steps else None


def _rename(s: dict) -> dict:
    return {"max_over_mean": s["load_max_over_mean"], "cv": s["load_cv"], "dead": s["dead_experts"],
            "dropped": s["dropped_fraction"]}


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")
