"""Checkpoints (model, optimizer, data position, RNGs in the single-device layout: exact resume at any world size)
and the final export in the Hugging Face layout.

A checkpoint holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`: a
planted file cannot run code on --resume."""

from __future__ import annotations

import logging
import os
import pickle
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
from .moe_recipe import MoERecipe

log = logging.getLogger(__name__)
STATE_KEYS = ("step", "config", "model", "optimizer", "loader", "rng")

def save(out: Path, step: int, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer,
         loader: TokenLoader, recipe: MoERecipe, world: distributed.World) -> None:
    """OUT/checkpoints/ckpt-{step}.pt in the single-device layout, gathered and written by rank 0 (every rank takes
    part in the gather), atomically and durably (temp file fsynced, renamed, folder fsynced); the newest keep_last
    are kept."""
    model_sd, opt_sd = distributed.full_state_dicts(model, opt)
    if not world.is_main:
        return
    state = {"step": step, "config": cfg.to_dict(), "model": model_sd, "optimizer": opt_sd,
             "loader": loader.state_dict(), "recipe": recipe.state_dict(), "rng": _rng_state()}
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the data on disk before the rename makes it the newest checkpoint
    os.replace(tmp, path)
    _fsync_dir(ckpt_dir)
    for old in sorted(ckpt_dir.glob("ckpt-*.pt"))[:-cfg.keep_last]:
        old.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def restore(out: Path, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer, loader: TokenLoader,
            recipe: MoERecipe) -> int:
    """Load the newest readable checkpoint under out into model, optimizer, loader, recipe and RNGs; -> its step.

    A newest checkpoint that does not load (truncated by a crash, or not a weights-only file) is skipped with a
    warning naming it, for the one before."""
    found = sorted((out / "checkpoints").glob("ckpt-*.pt"), reverse=True)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {out}/checkpoints")
    for ckpt in found:
        try:
            state = _read(ckpt)
            break
        except ValueError as e:
            log.warning("--resume: skipping %s: %s", ckpt, e)
    else:
        raise ValueError(f"--resume: none of the {len(found)} checkpoints in {out}/checkpoints loads "
                         f"(see the warnings); start again without --resume, in a fresh --out")
    if state["config"] != cfg.to_dict():
        raise ValueError(f"{ckpt} was written with another config; resume with the same flags")
    distributed.load_full_state_dicts(model, opt, state["model"], state["optimizer"])
    loader.load_state_dict(state["loader"])
    # checkpoints from before the recipe had state: every step took batch_size sequences
    recipe.load_state_dict(state.get("recipe", {"sequences": state["step"] * cfg.batch_size}))
    _set_rng_state(state["rng"])
    return state["step"]


def _read(ckpt: Path) -> dict:
    """The checkpoint's state, loaded weights-only (tensors and plain values; no code runs); ValueError if not."""
    try:
        state = torch.load(ckpt, weights_only=True, map_location="cpu")  # loading copies to the model's device
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"not a readable weights-only checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"not an openseek training checkpoint (needs {', '.join(STATE_KEYS)})")
    return state


def _rng_state() -> dict:
    """The RNGs' states as tensors and plain values: numpy's key array becomes a list of ints."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, keys.tolist(), pos, has_gauss, cached)}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


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
