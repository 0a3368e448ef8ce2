"""A tiny DeepSeek-V2-style tokenizer folder built offline: byte-level BPE, V2's special tokens, V2-Chat's template."""

from __future__ import annotations

import json
from pathlib import Path

from openseek.train.bpe import BOS, EOS, tokenizer_config  # noqa: F401 (BOS and EOS are re-exported to tests)

# Enough repeated English, code, CJK and emoji for the merges to span multi-byte characters.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "User: Hello, how are you today?\n\nAssistant: I am fine, thank you for asking.",
    "def forward(self, x):\n    return self.proj(x) + x\n",
    "DeepSeek-V2 uses multi-head latent attention and a mixture of experts.",
    "你好，世界！深度求索的模型支持中文和英文。" * 3,
    "今天天气很好，我们去公园散步吧。",
    "日本語のテキストも少し含めます。",
    "Emoji: 😀 🚀 🎉 👍 😀 🚀 🎉 👍",
    "Numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
]


def write_test_tokenizer(path, vocab_size: int = 300, template: bool = True, bos_post_processor: bool = False) -> int:
    """Write tokenizer.json + tokenizer_config.json for a byte-level BPE with V2's BOS/EOS; return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be >= 258 (256 byte tokens + BOS + EOS)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([BOS, EOS])  # last ids, as in V2 (100000, 100001)
    if bos_post_processor:  # some tokenizer.json files prepend BOS themselves
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(path / "tokenizer.json"))

    config = tokenizer_config(model_max_length=16384)
    if not template:
        del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    size = tok.get_vocab_size(with_added_tokens=True)
    assert size <= vocab_size, f"trained {size} tokens, asked for at most {vocab_size}"
    return size
