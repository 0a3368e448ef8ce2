"""The house's boundaries (STYLE.md): one-way data flow config -> model -> engine -> server, model -> train; the
server on the engine's public API only; model math that reaches fast paths only through the kernel dispatch."""

from __future__ import annotations

import ast
from pathlib import Path

import openseek
import openseek.engine
import openseek.model.ops

ROOT = Path(openseek.__file__).parent
ORDER = ["validation", "config", "tokenizer", "model", "engine", "server", "train"]  # left never imports right
ALLOWED = {"train": {"validation", "config", "tokenizer", "model"},
           "server": {"validation", "config", "tokenizer", "model", "engine"}}
MATH_FILES = ("layers.py", "mla.py", "moe.py", "transformer.py")
DISPATCH_NAMES = {"Kernels", "REFERENCE", "TRAINING", "INFERENCE"}
# what choosing a fast path looks like: these belong in model/ops.py, not in the math
FAST_PATH_SIGNS = ("is_grad_enabled", "requires_grad", "is_autocast_enabled", "torch.mv", "_grouped_mm",
                   "autograd.Function", "device.type")


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "openseek" and parts[1] in ORDER else None


def imports(f: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every `from X import ...` in f."""
    rel = f.relative_to(ROOT.parent).with_suffix("")
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = rel.parts[: len(rel.parts) - node.level] if node.level else ()
            target = ".".join(base + ((node.module,) if node.module else ()))
            out.append((target, [a.name for a in node.names]))
    return out


def test_no_backward_imports():
    bad = []
    for f in ROOT.rglob("*.py"):
        here = layer(".".join(f.relative_to(ROOT.parent).with_suffix("").parts))
        if here is None:
            continue  # cli.py and __init__ may import anything
        for target, _ in imports(f):
            there = layer(target)
            allowed = ALLOWED.get(here, set(ORDER[: ORDER.index(here)]))
            if there and there != here and there not in allowed:
                bad.append(f"{f.name} ({here}) imports {target}")
    assert not bad, bad


def test_server_and_chat_use_only_the_engine_packages_public_names():
    bad = []
    for f in [*sorted((ROOT / "server").glob("*.py")), ROOT / "chat.py"]:
        for target, names in imports(f):
            if target.startswith("openseek.engine") and (target != "openseek.engine"
                                                         or set(names) - set(openseek.engine.__all__)):
                bad.append(f"{f.name}: from {target} import {names}")
    assert not bad, bad


def test_model_math_reaches_fast_paths_only_through_the_dispatch():
    bad = []
    for name in MATH_FILES:
        f = ROOT / "model" / name
        for target, names in imports(f):
            if target == "openseek.model.ops" and set(names) - DISPATCH_NAMES:
                bad.append(f"{name} imports {sorted(set(names) - DISPATCH_NAMES)} from ops")
        source = f.read_text()
        bad += [f"{name} mentions {sign}" for sign in FAST_PATH_SIGNS if sign in source]
    assert DISPATCH_NAMES <= set(vars(openseek.model.ops))
    assert not bad, bad
