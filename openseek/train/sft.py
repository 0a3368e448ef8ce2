"""Supervised fine-tuning data (V2's first alignment stage): instruction pairs mined from the corpus itself (a
function's docstring as the user turn, its code as the assistant turn), rendered through the model's chat template,
with the loss on assistant tokens only.

Examples are packed whole into rows of S+1 tokens (greedily, in a seeded order) and padded; a row's targets are
IGNORE_INDEX everywhere but on the assistant's tokens and its closing EOS. Shapes: B rows, S tokens per row.
"""

from __future__ import annotations

import ast
import inspect
import logging
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import Tokenizer
from .data import _read_text
from .loss import IGNORE_INDEX

log = logging.getLogger(__name__)

MIN_DOCSTRING_CHARS = 16  # shorter ones ("Helper.", "Return x.") make poor instructions


@dataclass(slots=True)
class Example:
    prompt: str  # the user turn
    answer: str  # the assistant turn


def instruction_pairs(files: list[Path]) -> list[Example]:
    """One example per documented function or method in the Python files: docstring -> its full source."""
    examples = []
    for f in files:
        text = _read_text(f)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError) as e:  # test data in the standard library includes deliberately bad files
            log.info("sft: skipping %s: %s", f, e)
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc is None or len(doc) < MIN_DOCSTRING_CHARS:
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))  # from `def`, decorators off
            examples.append(Example(inspect.cleandoc(doc), source))
    return examples


@dataclass(slots=True)
class ChatDataset:
    """Packed SFT rows; it answers the loader protocol of data.PackedDataset (num_windows, windows, num_targets)."""

    inputs: torch.Tensor  # (rows, S) token ids, 0-padded
    targets: torch.Tensor  # (rows, S) next-token ids on assistant tokens, IGNORE_INDEX elsewhere
    num_bytes: int  # UTF-8 bytes of the assistant turns: bits per byte of the answers
    num_examples: int
    folder: str = "sft examples"

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def num_windows(self, seq_len: int, cover_tail: bool = False) -> int:
        if seq_len != self.inputs.shape[1]:
            raise ValueError(f"this SFT dataset was packed for seq_len={self.inputs.shape[1]}, not {seq_len}")
        return len(self.inputs)

    def windows(self, indices: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets) of rows `indices`; an index past the end is a row of padding."""
        self.num_windows(seq_len)
        padding = (torch.zeros(1, seq_len, dtype=torch.int64), torch.full((1, seq_len), IGNORE_INDEX))
        rows = [(self.inputs[i:i + 1], self.targets[i:i + 1]) if i < len(self.inputs) else padding for i in indices]
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])  # (B, S), (B, S)


def tokenize_example(ex: Example, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """(ids, n_prompt): the rendered conversation, tokenized as it is served (the prompt with the generation
    prompt, then the completion on its own) so training sees the token boundary that inference produces."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt},
                                          {"role": "assistant", "content": ex.answer}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the generation prompt differently from a finished turn; "
                         "SFT needs the conversation to extend the prompt")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return prompt_ids + tokenizer.encode(full[len(prompt):], add_special_tokens=False), len(prompt_ids)


def build_chat_dataset(examples: list[Example], tokenizer: Tokenizer, seq_len: int, seed: int = 0) -> ChatDataset:
    """Tokenize, drop examples longer than S+1 tokens, and pack the rest whole into rows in a seeded order."""
    if tokenizer.chat_template is None:
        raise ValueError("SFT needs a tokenizer with a chat_template (tokenizer_config.json)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, row, num_bytes, kept = [], [], 0, 0
    for i in order:
        ids, n_prompt = tokenize_example(examples[i], tokenizer)
        if len(ids) > seq_len + 1:
            continue
        if len(row) + len(ids) > seq_len + 1:
            rows.append(row)
            row = []
        row += [(t, j >= n_prompt) for j, t in enumerate(ids)]  # (token, is it an assistant token)
        num_bytes += len(examples[i].answer.encode())
        kept += 1
    if row:
        rows.append(row)
    if not rows:
        raise ValueError(f"no SFT example fits seq_len + 1 = {seq_len + 1} tokens (of {len(examples)} examples)")
    log.info("sft: %d of %d examples in %d rows of %d tokens", kept, len(examples), len(rows), seq_len)
    inputs = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for r, tokens in enumerate(rows):
        ids = torch.tensor([t for t, _ in tokens])
        trained = torch.tensor([a for _, a in tokens[1:]], dtype=torch.bool)  # whether target j+1 is the assistant's
        n = len(tokens) - 1
        inputs[r, :n] = ids[:-1]
        targets[r, :n] = torch.where(trained, ids[1:], IGNORE_INDEX)
    return ChatDataset(inputs, targets, num_bytes, kept)

