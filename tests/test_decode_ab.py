"""bench/decode_ab.py: two worker processes, each running its own revision's openseek, step in turn; on identical
code (HEAD against a working tree whose package is HEAD's) they agree on every greedy token."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_decode_ab_runs_both_sides_and_identical_code_gives_identical_tokens():
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "openseek"],
                             capture_output=True, text=True)
    if changed.returncode or changed.stdout.strip():
        pytest.skip("needs a git checkout whose openseek package is HEAD's")
    out = subprocess.run([sys.executable, "bench/decode_ab.py", "HEAD", "--models", "bundled", "--batches", "1,2",
                          "--rounds", "2", "--new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| bundled")]
    assert len(rows) == 2, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "yes", row  # the same greedy tokens on both sides
        ratio = float(re.fullmatch(r"([\d.]+)x", cells[-2]).group(1))
        assert 0.5 < ratio < 2, row  # identical code: no side is twice the other
