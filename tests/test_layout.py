"""The house's one-way data flow (STYLE.md): config -> model -> engine -> server; model -> train."""

from __future__ import annotations

import ast
from pathlib import Path

import openseek

ORDER = ["config", "tokenizer", "model", "engine", "server", "train"]  # left never imports right
ALLOWED = {"train": {"config", "tokenizer", "model"}, "server": {"config", "tokenizer", "model", "engine"}}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "openseek" and parts[1] in ORDER else None


def test_no_backward_imports():
    root = Path(openseek.__file__).parent
    bad = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("")
        here = layer(".".join(rel.parts))
        if here is None:
            continue  # cli.py and __init__ may import anything
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = rel.parts[: len(rel.parts) - node.level]
                target = ".".join(base + ((node.module,) if node.module else ()))
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
            else:
                continue
            there = layer(target)
            allowed = ALLOWED.get(here, set(ORDER[: ORDER.index(here)]))
            if there and there != here and there not in allowed:
                bad.append(f"{f.name} ({here}) imports {target}")
    assert not bad, bad
