"""Supervised fine-tuning: instruction pairs from code, chat-template rendering, loss on assistant tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from openseek.tokenizer import Tokenizer
from openseek.train.config import train_preset
from openseek.train.loss import IGNORE_INDEX
from openseek.train.run import train
from openseek.train.sft import Example, build_chat_dataset, instruction_pairs

SOURCE = '''
import os


def area(w, h):
    """Return the area of a w by h rectangle."""
    return w * h


class Box:
    @property
    def volume(self):
        """The volume of the box, in cubic units."""
        return self.w * self.h * self.d

    def name(self):
        """Short."""
        return "box"


def undocumented():
    return 1
'''


def test_instruction_pairs_are_docstring_then_whole_function(tmp_path):
    (tmp_path / "a.py").write_text(SOURCE)
    (tmp_path / "bad.py").write_text("def broken(:\n")
    pairs = instruction_pairs([tmp_path / "a.py", tmp_path / "bad.py"])
    by_prompt = {p.prompt: p.answer for p in pairs}
    assert set(by_prompt) == {"Return the area of a w by h rectangle.", "The volume of the box, in cubic units."}
    assert by_prompt["Return the area of a w by h rectangle."] == (
        'def area(w, h):\n    """Return the area of a w by h rectangle."""\n    return w * h')
    assert by_prompt["The volume of the box, in cubic units."].startswith("def volume(self):\n    \"\"\"The")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers_util import write_test_tokenizer
    path = tmp_path_factory.mktemp("tok")
    write_test_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def test_only_assistant_tokens_and_eos_are_targets(tokenizer):
    examples = [Example(f"Question number {i}?", f"def f{i}():\n    return {i}" + "0" * i) for i in range(12)]
    ds = build_chat_dataset(examples, tokenizer, seq_len=128, seed=3)
    assert ds.num_examples == 12 and ds.inputs.shape[1] == 128 and len(ds.inputs) > 1
    eos = tokenizer.eos_token_id
    answers = []
    for x, y in zip(ds.inputs, ds.targets):
        trained = y[y != IGNORE_INDEX].tolist()
        # every target is the next input token, and no prompt text is ever a target
        pos = (y != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(y[pos[:-1]], x[pos[:-1] + 1])
        answers += tokenizer.decode(trained, skip_special_tokens=False).split(tokenizer.decode([eos], False))[:-1]
        assert trained.count(eos) == tokenizer.decode(x.tolist(), False).count("User: ")
    # the V2 template: "User: {q}\n\nAssistant: {a}<eos>"; targets are " {a}<eos>" and nothing else
    assert sorted(answers) == sorted(" " + e.answer for e in examples)
    assert ds.num_bytes == sum(len(e.answer.encode()) for e in examples)


def test_examples_longer_than_a_row_are_dropped_not_cut(tokenizer):
    ds = build_chat_dataset([Example("short?", "yes"), Example("long?", "x " * 200)], tokenizer, seq_len=32)
    assert ds.num_examples == 1 and ds.inputs.shape == (1, 32)
    with pytest.raises(ValueError, match="no SFT example fits"):
        build_chat_dataset([Example("long?", "x " * 200)], tokenizer, seq_len=32)


def test_sft_fine_tunes_an_exported_model_and_lowers_answer_loss(corpus, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for i in range(6):  # small documented functions: both the pre-training text and the SFT pairs
        (code / f"m{i}.py").write_text("".join(
            f'def f{i}_{j}(x):\n    """Add {j} to x and return the sum."""\n    return x + {j}\n\n\n' for j in range(8)))
    base = dict(data=[str(corpus), str(code)], vocab_size=300, seq_len=128, batch_size=4, warmup=1, val_fraction=0.3,
                eval_every=4, save_every=4)
    pre = train(train_preset("tiny", **base, steps=4), tmp_path / "pre", progress=False)
    with pytest.raises(ValueError, match="init brings its own architecture|leave model empty"):
        train_preset("tiny", **base, init=str(pre))
    cfg = train_preset("demo-sft", **base, init=str(pre), steps=16, lr=3e-3)
    out = train(cfg, tmp_path / "sft", progress=False)
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert val[-1]["loss"] < val[0]["loss"] and "bpb" in val[-1]
    assert (out / "tokenizer_config.json").read_text() == (pre / "tokenizer_config.json").read_text()
    import openseek
    assert openseek.load_pretrained(out).config.num_hidden_layers == openseek.load_pretrained(pre).config.num_hidden_layers


def test_sft_without_init_names_the_field():
    with pytest.raises(ValueError, match="sft=True needs init"):
        train_preset("demo-sft")


def test_cli_flags_for_optional_fields_are_not_prefixes_of_others():
    from openseek.cli import build_parser
    args = build_parser().parse_args(["train", "--preset", "demo-sft", "--sft", "--init", "runs/demo/model",
                                      "--capacity-factor", "1.5"])
    assert (args.init, args.sft, args.capacity_factor, args.init_std) == ("runs/demo/model", True, 1.5, None)
