"""A byte-level BPE with DeepSeek-V2's special tokens and chat template, trained with the `tokenizers` library."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Iterator

from ..tokenizer import Tokenizer
from .data import _read_text

log = logging.getLogger(__name__)

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # <｜begin▁of▁sentence｜>: U+FF5C bars, U+2581 separators
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # <｜end▁of▁sentence｜>

# DeepSeek-V2-Chat's tokenizer_config.json chat_template, verbatim (reference §7).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

MIN_VOCAB_SIZE = 256 + 2 + 6  # every byte, BOS and EOS, and room for a few merges


def tokenizer_config(model_max_length: int = 16384) -> dict:
    """DeepSeek-V2-Chat's tokenizer_config.json: BOS added, EOS also the padding, the chat template."""
    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    return {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
            "pad_token": added(EOS), "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: str | Path, max_bytes: int | None = None,
                    model_max_length: int = 16384, exact: bool = False) -> Tokenizer:
    """Train a byte-level BPE on (a max_bytes sample of) files; write tokenizer.json + tokenizer_config.json.

    A sample too small for vocab_size runs out of merges: the smaller vocabulary is kept with a warning, or with
    exact=True nothing is written and a ValueError says which vocab_size the sample supports."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {MIN_VOCAB_SIZE} "
                         "(256 byte tokens, BOS, EOS and a few merges)")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes!r} must be >= 1 (or None for every file)")
    if not files:
        raise ValueError("train_tokenizer got no files")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # all 256 byte symbols from the start, so any text encodes even if the sample lacks some bytes
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_sample_texts(files, max_bytes), trainer=trainer)
    backend.add_special_tokens([BOS, EOS])  # the last ids, as in V2 (100000, 100001)
    trained = backend.get_vocab_size(with_added_tokens=True)
    if trained < vocab_size and exact:
        raise ValueError(f"vocab_size={vocab_size}: the corpus sample ran out of merges at {trained} tokens; "
                         f"ask for vocab_size={trained} or fewer, or give more text")
    if trained < vocab_size:
        log.warning("the corpus sample ran out of merges: %d tokens instead of vocab_size=%d", trained, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config = json.dumps(tokenizer_config(model_max_length), ensure_ascii=False, indent=2)
    (out / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return Tokenizer.from_pretrained(out)


def _sample_texts(files: list[Path], max_bytes: int | None) -> Iterator[str]:
    """Every file's text, or files in a fixed shuffled order until max_bytes (the last one cut at a character)."""
    if max_bytes is None:
        yield from map(_read_text, files)
        return
    left = max_bytes
    for i in random.Random(0).sample(range(len(files)), len(files)):
        data = _read_text(files[i]).encode()[:left]
        yield data.decode("utf-8", errors="ignore")
        left -= len(data)
        if left <= 0:
            return
