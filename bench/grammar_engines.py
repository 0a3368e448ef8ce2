"""Which grammar engine for structured output: xgrammar, llguidance or outlines-core, measured on this CPU.

For each engine and vocabulary (the bundled model's 4,096 tokens, and a 32,000-token byte-level BPE trained on the
standard library here, the size of a Llama/Mistral vocabulary):
  setup     building the engine's tokenizer view (once per server)
  compile   a schema to a ready matcher, cold (each engine's own cache cleared or bypassed)
  per token filling the (V,) mask for the next token, then advancing with it, along a valid JSON instance of the
            schema tokenized by the model's tokenizer (the path a constrained decode takes), one thread

    pip install xgrammar==0.2.9 outlines-core==0.2.14   # the candidates openseek does not depend on
    python bench/grammar_engines.py > bench/results/grammar_engines.txt
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openseek import BUNDLED_MODEL  # noqa: E402
from openseek.tokenizer import Tokenizer  # noqa: E402

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    "enum+bounds": ({"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "score": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["colour", "score", "count"]}, {"colour": "green", "score": 0.25, "count": 42}),
    "nested+array": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {
            "type": "array", "items": {"type": "string"}, "maxItems": 4}}, "required": ["id", "tags"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"]}}}, "required": ["user", "items"]},
        {"user": {"id": 7, "tags": ["a", "bc"]}, "items": [{"sku": "ABC-1234", "qty": 2}, {"sku": "XYZ-0001",
                                                                                          "qty": 10}]}),
    "wide": ({"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]}
                                               for i in range(40)}, "required": [f"field_{i}" for i in range(40)]},
             {f"field_{i}": [f"v{i}", i, i % 2 == 0][i % 3] for i in range(40)}),
}


def vocabularies() -> dict[str, Path]:
    """The bundled tokenizer, and a 32,000-token BPE trained on the stdlib (a few seconds, cached in /tmp)."""
    from openseek.train.bpe import train_tokenizer

    big = Path(tempfile.gettempdir()) / "openseek-bpe-32000"
    if not (big / "tokenizer.json").is_file():
        files = sorted(Path(json.__file__).parents[1].glob("*.py"))
        train_tokenizer(files, 32000, big)
    return {"bundled-4096": BUNDLED_MODEL, "bpe-32000": big}


class XGrammar:
    name = "xgrammar 0.2.9"

    def __init__(self, folder: Path, tok: Tokenizer):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        self.xgr, self.V = xgr, tok.vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.V, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, self.V)

    def compile(self, schema: dict):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                           separators=(",", ":")))

    def step(self, m, token: int) -> None:
        m.fill_next_token_bitmask(self.mask, 0)
        assert m.accept_token(token), "xgrammar refused a valid token"


class LLGuidance:
    name = "llguidance 1.9.1"

    def __init__(self, folder: Path, tok: Tokenizer):
        import llguidance
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=tok.vocab_size,
                                          eos_token=tok.eos_token_id)
        self.mask = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token: int) -> None:
        self.llt.fill_next_token_bitmask(m, self.mask, 0)
        assert m.consume_token(token), m.get_error()


class OutlinesCore:
    name = "outlines-core 0.2.14"

    def __init__(self, folder: Path, tok: Tokenizer):
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i != tok.eos_token_id:
                by_bytes.setdefault(tok.token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_token_id, by_bytes)
        self.mask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Guide(self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocab))

    def step(self, g, token: int) -> None:
        g.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        g.advance(token)


def measure(engine, tok: Tokenizer, schema: dict, instance) -> tuple[float, float]:
    """(compile ms, per-token mask+advance us) for one schema, medians of a few runs."""
    ids = tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
    compiles, steps = [], []
    for _ in range(3):
        t = time.perf_counter()
        m = engine.compile(schema)
        compiles.append(time.perf_counter() - t)
        t = time.perf_counter()
        for token in ids:
            engine.step(m, token)
        steps.append((time.perf_counter() - t) / len(ids))
    return statistics.median(compiles) * 1e3, statistics.median(steps) * 1e6


def import_ms(module: str) -> float:
    """Import time in a fresh interpreter (torch already loaded), with what the module pulls in."""
    code = f"import time, torch; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread; medians of 3 runs")
    print("import ms: " + ", ".join(f"{m} {import_ms(m):.0f}" for m in ("xgrammar", "llguidance", "outlines_core")))
    print()
    print(f"{'engine':22} {'vocab':13} {'setup ms':>9} " + " ".join(f"{k + ' ms/us':>24}" for k in SCHEMAS))
    for vocab, folder in vocabularies().items():
        tok = Tokenizer.from_pretrained(folder)
        for cls in (XGrammar, LLGuidance, OutlinesCore):
            t = time.perf_counter()
            try:
                engine = cls(folder, tok)
            except Exception as e:  # an engine that cannot load is a result too
                print(f"{cls.name:22} {vocab:13} failed: {type(e).__name__}: {e}")
                continue
            setup = (time.perf_counter() - t) * 1e3
            cells = []
            for schema, instance in SCHEMAS.values():
                try:
                    c, s = measure(engine, tok, schema, instance)
                    cells.append(f"{c:>12.1f} / {s:>8.1f}")
                except Exception as e:
                    cells.append(f"{'failed: ' + type(e).__name__:>24}")
            print(f"{cls.name:22} {vocab:13} {setup:>9.0f} " + " ".join(cells), flush=True)
    print("\ncells: cold compile ms / per-token (fill mask + advance) us; setup includes the first import")


if __name__ == "__main__":
    main()
