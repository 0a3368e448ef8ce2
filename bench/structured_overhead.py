"""Per-token cost of structured output against unconstrained decoding, at 1 and 16 concurrent requests, one run.

    python bench/structured_overhead.py [--model PATH] [--tokens 128] > bench/results/structured_overhead.txt

The offline engine (no HTTP) on the bundled model by default: its 16M parameters make a decode step short, so
the grammar's share is the largest it gets. Each request decodes exactly --tokens tokens (the schemas cannot end
sooner; plain requests ignore EOS), seeded sampling at temperature 0.8; best of --repeats interleaved runs, prompts of
a few tokens so that decode dominates. Grammars are compiled (and cached) before the timed runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

from openseek import BUNDLED_MODEL, LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from openseek.engine import engine as engine_module  # noqa: E402

SCHEMAS = {
    "long string": {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
                    "required": ["text"]},
    "int array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 2000},
}


class GrammarClock:
    """Seconds spent in the engine's grammar calls (masks, then advancing), timed by wrapping them."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("token_masks", "advance"):
            setattr(engine_module, name, self._timed(getattr(engine_module, name)))

    def _timed(self, fn):
        def wrapper(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t
        return wrapper


def run(llm: LLM, concurrency: int, tokens: int, schema: dict | None, seed: int, clock: GrammarClock
        ) -> tuple[float, float]:
    """(wall seconds, grammar seconds) per generated token, `concurrency` requests of `tokens` tokens each."""
    structured = StructuredOutputsParams(json=schema) if schema else None
    prompts = [f"def f{i}(x):" for i in range(concurrency)]
    params = SamplingParams(max_tokens=tokens, temperature=0.8, seed=seed, ignore_eos=schema is None,
                            structured_outputs=structured)
    clock.seconds = 0.0
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    n = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert n == concurrency * tokens, f"{n} tokens, expected {concurrency * tokens}"
    return elapsed / n, clock.seconds / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=torch.float32, max_num_seqs=16)
    for schema in SCHEMAS.values():  # compile once, outside the timing
        llm.llm_engine.compile_grammar(StructuredOutputsParams(json=schema))
    clock = GrammarClock()
    run(llm, 2, 8, None, 0, clock)  # warm-up
    print(machine_line())
    print(f"model {args.model}, {args.tokens} tokens per request, best of {args.repeats} interleaved runs, "
          f"{args.threads} thread(s)\n")
    print("| concurrent | unconstrained ms/token | " + " | ".join(f"{k}: ms/token, overhead, of which grammar"
                                                         for k in SCHEMAS) + " |")
    print("|---:|---:|" + "---:|" * len(SCHEMAS))
    for concurrency in (1, 16):
        best: dict[str | None, tuple[float, float]] = {}
        for r in range(args.repeats):  # interleaved, so that load from other work hits every variant alike
            for name in (None, *SCHEMAS):
                t = run(llm, concurrency, args.tokens, SCHEMAS.get(name), r, clock)
                best[name] = min(best.get(name, t), t)
        base = best[None][0]
        cells = [f"{best[k][0] * 1e3:.3f}, {(best[k][0] / base - 1) * 100:+.1f}%, {best[k][1] / base * 100:.1f}%"
                 for k in SCHEMAS]
        print(f"| {concurrency} | {base * 1e3:.3f} | " + " | ".join(cells) + " |", flush=True)
    print("\noverhead: wall time against unconstrained; of which grammar: the time inside the grammar calls "
          "(mask fill + unpack, advance) as a share of the unconstrained time per token. The wall figures also "
          "carry what the text changes: a MoE step costs what its distinct experts cost, and JSON digits route "
          "to fewer experts than prose, so the grammar's own share is the clean figure")

if __name__ == "__main__":
    main()
