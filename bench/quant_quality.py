"""int8 / int4 weights against float32 on the bundled model: held-out bits per byte, and greedy agreement (the
share of 64-token greedy continuations' tokens equal to float32's, over 32 prompts cut from the Python standard
library's source).

    python bench/quant_quality.py [--new-tokens 64] [--prompts 32] [--group-size 32] [--bpb-tokens 65536]

Bits per byte: the model's pre-training validation split (the standard library's held-out files, split as
`openseek train` splits them), each file packed as [BOS] text [EOS] as training packs it, the first --bpb-tokens
of them cut into 512-token windows; cross-entropy summed over each window's predicted tokens (all but its first)
over the UTF-8 bytes those tokens decode to. The same windows for every format, so their ratio is exact.
Position-by-position agreement counts a token after the first divergence only if it happens to match again; the
identical prefix is the stricter figure.
"""

from __future__ import annotations

import argparse
import random
import sysconfig
from pathlib import Path

import torch

from common import machine_line, markdown_table

import openseek
from openseek import BUNDLED_MODEL, LLM, SamplingParams
from openseek.tokenizer import Tokenizer
from openseek.train.data import bits_per_byte, corpus_files, split_files

WINDOW = 512


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


def held_out_windows(tok: Tokenizer, max_tokens: int) -> tuple[torch.Tensor, int]:
    """(windows (W, WINDOW) of the packed validation split's first max_tokens, bytes their predicted tokens decode to)."""
    ids: list[int] = []
    for f in split_files(corpus_files())[1]:
        ids += [tok.bos_token_id] + tok.encode(f.read_text(), add_special_tokens=False) + [tok.eos_token_id]
        if len(ids) >= max_tokens:
            break
    windows = torch.tensor(ids[:max_tokens // WINDOW * WINDOW]).view(-1, WINDOW)
    # each window's predicted tokens decoded together: a character split by a window's edge is its only inexactness
    return windows, sum(len(tok.decode(w[1:].tolist()).encode()) for w in windows)


@torch.no_grad()
def bpb(model: torch.nn.Module, windows: torch.Tensor, num_bytes: int, batch: int = 8) -> float:
    nats = 0.0
    for rows in windows.split(batch):
        logits = model(rows)[:, :-1].float()  # (B, WINDOW - 1, V)
        nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
    return bits_per_byte(nats, num_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=32, help="int4 (the bundled model's expert width is 96)")
    p.add_argument("--bpb-tokens", type=int, default=65536, help="validation tokens scored (0: skip)")
    args = p.parse_args()
    print(machine_line())
    quantized = {"float32": {}, "int8": dict(quantization="int8"),
                 "int4": dict(quantization="int4", group_size=args.group_size)}
    scores = {}
    if args.bpb_tokens:
        windows, num_bytes = held_out_windows(Tokenizer.from_pretrained(BUNDLED_MODEL), args.bpb_tokens)
        for name, kw in quantized.items():
            scores[name] = bpb(openseek.load_pretrained(BUNDLED_MODEL, dtype=torch.float32, **kw), windows, num_bytes)
        print(f"held-out bits per byte over {windows.numel()} tokens ({num_bytes} bytes): "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
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
        bpb_cells = [f"{scores[name]:.4f}", f"{100 * (scores[name] / scores['float32'] - 1):+.2f}%"] if scores \
            else ["", ""]
        rows.append([name, *bpb_cells, f"{100 * same:.1f}%", f"{sum(prefix) / len(prefix):.1f} / {n}",
                     f"{sum(k == n for k in prefix)} / {len(texts)}"])
    print(markdown_table(["weights", "held-out bits per byte", "against float32", "tokens equal to float32's",
                          "mean identical prefix", "identical continuations"], rows))


if __name__ == "__main__":
    main()
