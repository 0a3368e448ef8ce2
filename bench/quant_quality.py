"""Greedy agreement of int8 / int4 weights with float32 on the bundled model: the share of 64-token greedy
continuations' tokens equal to float32's, over 32 prompts cut from the Python standard library's source.

    python bench/quant_quality.py [--new-tokens 64] [--prompts 32] [--group-size 32]

Position-by-position agreement counts a token after the first divergence only if it happens to match again; the
identical prefix is the stricter figure. Held-out bits per byte is left to the training tools.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
from pathlib import Path

import torch

from common import machine_line, markdown_table

from openseek import BUNDLED_MODEL, LLM, SamplingParams


def prompts(n: int, chars: int = 300, seed: int = 0) -> list[str]:
    """n snippets of `chars` characters from random standard-library files (json, email, http, ...)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for pkg in ("json", "email", "http", "logging", "urllib") for f in (stdlib / pkg).glob("*.py"))
    rng = random.Random(seed)
    out = []
    for f in rng.sample(files, n) if len(files) >= n else rng.choices(files, k=n):
        src = f.read_text()
        start = rng.randrange(0, max(1, len(src) - chars))
        out.append(src[start:start + chars])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=32, help="int4 (the bundled model's expert width is 96)")
    args = p.parse_args()
    print(machine_line())
    texts, n = prompts(args.prompts), args.new_tokens
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    runs = {"float32": {}, "int8": dict(quantization="int8"),
            "int4": dict(quantization="int4", quantization_group_size=args.group_size)}
    tokens = {}
    for name, kw in runs.items():
        llm = LLM(BUNDLED_MODEL, dtype="float32", max_num_seqs=len(texts), **kw)
        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(texts, params)]
    rows = []
    for name in ("int8", "int4"):
        pairs = list(zip(tokens["float32"], tokens[name]))
        same = sum(a == b for x, y in pairs for a, b in zip(x, y)) / (len(texts) * n)
        prefix = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), n) for x, y in pairs]
        rows.append([name, f"{100 * same:.1f}%", f"{sum(prefix) / len(prefix):.1f} / {n}",
                     f"{sum(k == n for k in prefix)} / {len(texts)}"])
    print(markdown_table(["weights", "tokens equal to float32's", "mean identical prefix", "identical continuations"],
                         rows))


if __name__ == "__main__":
    main()
