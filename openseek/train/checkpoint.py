"""Checkpoints (model, optimizer, data position, RNGs in the single-device layout: exact resume at any world size)
and the final export in the Hugging Face layout."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
import numpy as np
import torch

from ..model import Transformer, save_pretrained
from ..tokenizer import TOKENIZER_FILES
from . import distributed
from .config import TrainConfig
from .data import TokenLoader


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    return found[-1] if found else None


def save(out: Path, step: int, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer,
         loader: TokenLoader, world: distributed.World) -> None:
    """OUT/checkpoints/ckpt-{step}.pt in the single-device layout, gathered and written by rank 0 (every rank takes
    part in the gather), atomically (temp file, then rename); the newest keep_last are kept."""
    model_sd, opt_sd = distributed.full_state_dicts(model, opt)
    if not world.is_main:
        return
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    state = {"step": step, "config": cfg.to_dict(), "model": model_sd, "optimizer": opt_sd,
             "loader": loader.state_dict(), "rng": rng}
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step:07d}.pt"
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    for old in sorted(ckpt_dir.glob("ckpt-*.pt"))[:-cfg.keep_last]:
        old.unlink()


def restore(out: Path, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer, loader: TokenLoader) -> int:
    """Load the latest checkpoint under out into model, optimizer, loader and RNGs; -> its step."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out}/checkpoints")
    state = torch.load(ckpt, weights_only=False, map_location="cpu")  # loading copies to the model's device
    if state["config"] != cfg.to_dict():
        raise ValueError(f"{ckpt} was written with another config; resume with the same flags")
    distributed.load_full_state_dicts(model, opt, state["model"], state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]


def export(model: Transformer, tokenizer_dir: Path, out: Path, world: distributed.World) -> Path:
    """The final model in the Hugging Face layout under out/model, tokenizer files beside it (written by rank 0;
    a collective when experts are sharded)."""
    path = out / "model"
    full = distributed.gathered_model(model)
    if not world.is_main:
        return path
    save_pretrained(full, path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path
