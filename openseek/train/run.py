"""`openseek train`: data -> model -> steps with metrics, checkpoints and exact resume -> export."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import Transformer, load_pretrained
from ..summary import count_parameters
from ..tokenizer import Tokenizer
from . import bpe, checkpoint, data, distributed, sft
from .config import TrainConfig
from .grpo_run import train_grpo
from .rollout import SamplerFactory
from .tasks import get_task
from .metrics import MetricsLog, measure_peak_flops, train_record
from .step import build_optimizer, build_recipe, evaluate, init_weights, lr_at, train_step


@dataclass(slots=True)
class Prepared:
    tokenizer_dir: Path
    train: data.PackedDataset | sft.ChatDataset
    val: data.PackedDataset | sft.ChatDataset
    train_bos_eos: tuple[int, int]  # the tokenizer's, written into the exported config.json


def prepare_data(cfg: TrainConfig, out: Path) -> Prepared:
    """Tokenizer (init's, or trained) and the data: packed shards under OUT/data, reused when the inputs are
    unchanged, or with sft the instruction pairs of the corpus (or the task's demonstrations), packed in memory."""
    if cfg.sft and cfg.task is not None:
        return _task_demonstrations(cfg)
    files = data.corpus_files(cfg.data or None)
    train_files, val_files = data.split_files(files, cfg.val_fraction, cfg.seed)
    tok_dir = Path(cfg.init) if cfg.init is not None else out / "data" / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_pretrained(tok_dir)
    elif cfg.init is not None:
        raise ValueError(f"init={cfg.init} holds no tokenizer.json")
    else:
        # exact: a corpus too small for vocab_size is one error before anything is written, so a retry with
        # the vocab_size it names works in the same --out
        tokenizer = bpe.train_tokenizer(train_files, cfg.vocab_size, tok_dir, max_bytes=cfg.max_tokenizer_bytes,
                                        exact=True)
    if cfg.init is None and tokenizer.vocab_size != cfg.vocab_size:  # an earlier run's, in this --out
        raise ValueError(f"{tok_dir} holds the tokenizer of an earlier run, of vocab {tokenizer.vocab_size}; the "
                         f"config asks for {cfg.vocab_size}: use a fresh --out, or that vocab_size")
    if cfg.sft:
        train_set, val_set = (sft.build_chat_dataset(sft.instruction_pairs(f), tokenizer, cfg.seq_len, cfg.seed)
                              for f in (train_files, val_files))
    else:
        train_set, val_set = (data.pack_tokens(f, tokenizer, out / "data" / name)
                              for f, name in ((train_files, "train"), (val_files, "val")))
    return Prepared(tok_dir, train_set, val_set, (tokenizer.bos_token_id, tokenizer.eos_token_id))


def _task_demonstrations(cfg: TrainConfig) -> Prepared:
    """SFT data of a GRPO task: a correct completion of each training problem; the held-out ones validate."""
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    if tokenizer is None:
        raise ValueError(f"init={cfg.init} holds no tokenizer.json")
    task = get_task(cfg.task)
    train_set, val_set = (sft.build_chat_dataset([sft.Example(p.prompt, p.solution) for p in task.problems(split)],
                                                 tokenizer, cfg.seq_len, cfg.seed) for split in ("train", "heldout"))
    return Prepared(Path(cfg.init), train_set, val_set, (tokenizer.bos_token_id, tokenizer.eos_token_id))


def validation(model: Transformer, cfg: TrainConfig, ds: data.PackedDataset | sft.ChatDataset, dtype: torch.dtype,
               world: distributed.World = distributed.World()) -> dict:
    """Mean loss and bits per byte over the first eval_batches batches of the validation split (rows over ranks)."""
    batches = data.validation_batches(ds, cfg.batch_size // cfg.grad_accum, cfg.seq_len, world.rank, world.size)
    limited = (b for i, b in zip(range(cfg.eval_batches), batches))
    nats, tokens = evaluate(model, limited, dtype)
    if world.size > 1:
        total, tokens = distributed.sum_over_ranks([nats * tokens, tokens], world)
        nats, tokens = total / max(tokens, 1), int(tokens)
    rec = {"loss": nats, "tokens": tokens}
    if tokens >= ds.num_targets:  # bits per byte needs the whole split's bytes
        rec["bpb"] = data.bits_per_byte(nats * tokens, ds.num_bytes)
    else:  # estimate from the sampled fraction of the split
        rec["bpb_estimate"] = data.bits_per_byte(nats * ds.num_targets, ds.num_bytes)
    return rec


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, sampler_factory: SamplerFactory | None = None) -> Path | None:
    """Run (or continue) training; returns the exported model folder when the last step is reached.

    Under torchrun every rank runs this (distributed.py); rank 0 alone writes metrics, checkpoints and the export.
    GRPO (cfg.grpo) samples its rollouts from sampler_factory's engine (cli.engine_sampler)."""
    device = train_device(cfg.device)  # before any work: a bad device fails at once
    world = distributed.setup(device.type)
    try:
        cfg.check_world(world.size)
        if cfg.grpo:
            return train_grpo(cfg, Path(out), device, resume, stop_at, progress and world.is_main, world,
                              sampler_factory)
        return _train(cfg, Path(out), device, resume, stop_at, progress and world.is_main, world)
    finally:
        distributed.teardown(world)


def train_device(name: str) -> torch.device:
    """The device a run trains on: cuda is the current GPU (under torchrun, this rank's: distributed.setup sets it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train config device='cuda': no CUDA device is available; use device='cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def _train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool, stop_at: int | None, progress: bool,
           world: distributed.World) -> Path | None:
    check_memory(cfg.model_config())  # before the tokenizer and the data, which take minutes on a big corpus
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    prepared = distributed.main_first(world, lambda: prepare_data(cfg, out))
    model = _build_model(cfg, prepared.train_bos_eos).to(device).train()
    if cfg.expert_parallel:
        distributed.shard_experts(model, world)
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    loader = data.TokenLoader(prepared.train, cfg.batch_size, cfg.seq_len, cfg.seed, world.rank, world.size)
    step = checkpoint.restore(out, cfg, model, opt, loader, recipe) if resume else 0
    if world.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", step, enabled=world.is_main)
    dtype = getattr(torch, cfg.dtype)
    flops_per_token = 6 * count_parameters(model.config).activated_excl_embedding
    peak = measure_peak_flops(dtype, model.device) * world.size if world.is_main else 0.0
    parallel = distributed.DataParallel(model, recipe, world, dtype) if world.size > 1 else None  # 1 rank: none
    micro = cfg.batch_size // cfg.grad_accum // world.size
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    bar = _progress(progress, step, cfg.steps)
    while step < end:
        t0 = time.perf_counter()
        x, y = next(loader)
        lr = lr_at(cfg, step)
        res = train_step(model, opt, recipe, list(zip(x.split(micro), y.split(micro))), cfg, lr, dtype, parallel)
        res = distributed.mean_step_result(res, world)
        step += 1
        if step % cfg.log_every == 0 or step == end:
            log.write(train_record(step, res, lr, time.perf_counter() - t0, flops_per_token, peak, recipe))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log.write({"kind": "val", "step": step, **validation(model, cfg, prepared.val, dtype, world)})
        if step % cfg.save_every == 0 or step == end:
            checkpoint.save(out, step, cfg, model, opt, loader, recipe, world)
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.2e}")
    bar.close()
    if parallel is not None:
        parallel.close()
    recipe.remove(model)
    path = checkpoint.export(model, prepared.tokenizer_dir, out, world) if step >= cfg.steps else None
    distributed.barrier(world)  # every rank returns once rank 0's checkpoint and export are written
    return path


def check_memory(mcfg: ModelConfig) -> None:
    """Refuse a model whose float32 weights alone exceed this machine's memory: every run builds the whole model
    on the CPU first, and training needs about four times that (weights, gradients, AdamW's two moments)."""
    need = 4 * mcfg.num_parameters()
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"the model's {mcfg.num_parameters():.3g} parameters take {need / 2**30:,.0f} GiB in "
                         f"float32, more than this machine's {have / 2**30:,.0f} GiB of memory")


def _build_model(cfg: TrainConfig, bos_eos: tuple[int, int]) -> Transformer:
    """The initial model on the CPU: --init's weights, or a fresh one."""
    if cfg.init is not None:
        model = load_pretrained(cfg.init, dtype=torch.float32)
    else:
        mcfg = cfg.model_config()
        mcfg.bos_token_id, mcfg.eos_token_id = bos_eos
        model = Transformer(mcfg)
        init_weights(model, cfg.init_std, cfg.seed)  # the same seed: the same replica on every rank
    return model


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")
