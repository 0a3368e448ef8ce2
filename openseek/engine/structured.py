"""Structured output: a request's grammar compiled by llguidance, one matcher per sequence, its token mask per step.

A request names its constraint with `StructuredOutputsParams` (vLLM's names: json, regex, choice, grammar,
json_object, structural_tag). `GrammarCompiler` turns it into an llguidance matcher for the engine's tokenizer,
caching compiled ones by their text (bounded LRU); each sequence advances a deep copy of it with every token it
accepts. Before each step the sampler gets `token_masks()`: an (R, V) boolean for the R constrained rows, so a
constrained row can only draw what its grammar allows, and EOS only where the grammar may end. llguidance was
chosen by measurement (bench/results/grammar_engines.txt); it is imported lazily, on the first constrained request.

JSON is compact (no whitespace between tokens): free whitespace lets a model that writes code pad forever.

For callers building on this (tool calls, reasoning): `grammar` takes llguidance's Lark, in which `%json {...}`
embeds a schema and `<name>` or `<[id]>` names a special token, so "a call of tool X with arguments valid under
its schema" is one grammar; `structural_tag` constrains only the text after a trigger; and `reasoning_end` (set by
a server with a reasoning parser, not a request field) leaves the text free up to that string, then applies the
constraint: the reasoning is not constrained.

Shapes: R constrained rows, W 32-bit words of a row's bitmask, V vocabulary.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..validation import FieldError

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
CACHE_SIZE = 256  # compiled grammars kept; a schema is recompiled in about a millisecond when evicted


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one constraint on the output text."""

    json: str | dict | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect, %json embeds included) or GBNF
    json_object: bool | None = None  # any JSON object
    structural_tag: str | dict | None = None  # {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
    reasoning_end: str | None = None  # openseek's: free text up to and including this, then the constraint

    def __post_init__(self) -> None:
        chosen = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise FieldError("structured_outputs", chosen, f"must set exactly one of {', '.join(KINDS)}")
        kind, value = chosen[0], getattr(self, chosen[0])
        types = {"json": (str, dict), "regex": str, "choice": list, "grammar": str, "json_object": bool,
                 "structural_tag": (str, dict)}
        if not isinstance(value, types[kind]) or (kind == "choice" and not (
                value and all(isinstance(c, str) for c in value))):
            raise FieldError(f"structured_outputs.{kind}", value, "has the wrong type: json and structural_tag "
                             "take an object or its JSON text, choice a non-empty list of strings, regex and grammar "
                             "a string, json_object true")
        if self.reasoning_end is not None and not (isinstance(self.reasoning_end, str) and self.reasoning_end):
            raise FieldError("structured_outputs.reasoning_end", self.reasoning_end, "must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled grammar is cached by."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return self.kind, text if self.reasoning_end is None else json.dumps([self.reasoning_end, text])


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; thread-safe (the server compiles off its event loop)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int | None, cache_size: int = CACHE_SIZE):
        import llguidance

        self._ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size, self.cache_size = vocab_size, cache_size
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher at the start of params' grammar; ValueError naming why it cannot compile."""
        try:
            key = params.key()
        except RecursionError:  # json.dumps of a schema nested deeper than Python's recursion limit
            raise FieldError(f"structured_outputs.{params.kind}", "(a nested object)",
                             "is nested too deeply to compile") from None
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            template = self._compile(params)
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return template.deep_copy()

    def _compile(self, params: StructuredOutputsParams) -> Any:
        LLMatcher, kind = self._ll.LLMatcher, params.kind
        try:
            if kind in ("json", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else params.json
                if isinstance(schema, str):
                    schema = json.loads(schema)
                grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            elif kind == "structural_tag":
                grammar = self._structural_tag(params.structural_tag)
            else:
                grammar = self._ll.grammar_from(kind, getattr(params, kind))
            if params.reasoning_end is not None:
                grammar = _after(params.reasoning_end, grammar)
            matcher = LLMatcher(self.tokenizer, grammar)
        except (ValueError, TypeError, KeyError, AssertionError) as e:  # llguidance validates with assert too
            raise FieldError(f"structured_outputs.{kind}", _short(params), f"cannot compile: {e}") from None
        if matcher.is_error():
            raise FieldError(f"structured_outputs.{kind}", _short(params), f"cannot compile: {matcher.get_error()}")
        return matcher

    def _structural_tag(self, spec: str | dict) -> str:
        """vLLM's structural_tag ({"structures": [{"begin", "schema", "end"}], "triggers": [...]}) as a grammar:
        free text in which each trigger opens its structure, whose body follows its schema."""
        spec = json.loads(spec) if isinstance(spec, str) else spec
        shape = ('needs {"structures": [{"begin": str, "schema": object, "end": str}, ...], "triggers": [str, ...]}'
                 ", each begin starting with a trigger")
        ok = isinstance(spec, dict) and isinstance(spec.get("triggers"), list) and isinstance(spec.get("structures"),
                                                                                              list)
        structures = spec["structures"] if ok else []
        if not ok or not structures or not all(isinstance(t, str) and t for t in spec["triggers"]) or not all(
                isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                and isinstance(s.get("schema"), dict) for s in structures):
            raise ValueError(shape)
        tags = []
        for s in structures:
            trigger = next((t for t in spec["triggers"] if s["begin"].startswith(t)), None)
            if trigger is None:
                raise ValueError(f"structure begin {s['begin']!r} starts with none of the triggers {spec['triggers']}")
            tags.append(self._ll.StructTag(trigger=trigger, begin=s["begin"], grammar=s["schema"], end=s["end"]))
        return self._ll.StructTag.to_grammar(tags)


def _after(end: str, grammar: str) -> str:
    """`grammar` preceded by free text that ends with `end` (a lazy lexeme: the first `end` closes it)."""
    inner = json.loads(grammar)["grammars"] if grammar.lstrip().startswith("{") else [{"lark_grammar": grammar}]
    inner[0] = {**inner[0], "name": "constrained"}
    lark = f'start: free_text @constrained\nfree_text[lazy]: FREE_TEXT {json.dumps(end)}\nFREE_TEXT: /(.|\\n)*/\n'
    return json.dumps({"grammars": [{"lark_grammar": lark}, *inner]})


def token_masks(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """Each matcher's allowed next tokens, (R, V) bool."""
    from llguidance.numpy import fill_next_token_bitmask

    bits = np.zeros((len(matchers), -(-vocab_size // 32)), dtype=np.int32)  # (R, W)
    for i, m in enumerate(matchers):
        fill_next_token_bitmask(m, bits, i)
    # token 32w + k is bit k of word w; little-endian words unpack in that order
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]  # (R, V)
    return torch.from_numpy(allowed.view(np.bool_))


def advance(matcher: Any, token: int) -> bool:
    """Feed the sampled token to the matcher; True once its grammar has ended (no token but EOS may follow)."""
    if not matcher.consume_token(token):
        raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: {matcher.get_error()}")
    return matcher.is_stopped()


def _short(params: StructuredOutputsParams, limit: int = 200) -> str:
    text = params.key()[1]
    return text if len(text) <= limit else text[:limit] + "..."
