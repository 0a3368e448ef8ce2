"""Tokenizer wrapper: round trips, BOS policy, streaming detokenization, chat template parity with transformers."""

from __future__ import annotations

import pytest
from tokenizers_util import BOS, EOS, write_test_tokenizer

from openseek.tokenizer import IncrementalDetokenizer, Tokenizer

MIXED = "Hello, world! 你好，世界。 Emoji 😀🚀🎉 and 日本語 text; café naïve ü — done."
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi 你好"},
    {"role": "assistant", "content": "Hello! 😀"},
    {"role": "user", "content": "And now?"},
]
# reference §7: no newline between EOS and "User:", no space after the final "Assistant:"
CHAT_EXPECTED = (
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>You are a helpful assistant.\n\n"
    "User: Hi 你好\n\n"
    "Assistant: Hello! 😀<\uff5cend\u2581of\u2581sentence\uff5c>"
    "User: And now?\n\n"
    "Assistant:"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_test_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_pretrained(folder)


def test_special_tokens_and_vocab_match_the_written_tokenizer(tmp_path):
    size = write_test_tokenizer(tmp_path, vocab_size=280)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert size <= 280 and tok.vocab_size == size
    assert tok.bos_token_id == size - 2 and tok.eos_token_id == size - 1
    assert tok.id_to_token(tok.bos_token_id) == BOS and tok.token_to_id(EOS) == tok.eos_token_id
    assert "\uff5c" in BOS and "\u2581" in BOS  # the DeepSeek look-alike characters, not ASCII '|' and '_'
    assert tok.token_to_id("no such token") is None


def test_mixed_text_round_trips_and_ids_fit_the_vocab(tok):
    ids = tok.encode(MIXED)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == MIXED
    assert tok.decode(tok.encode(MIXED, add_special_tokens=False)) == MIXED


def test_bos_is_prepended_once(tok, tmp_path):
    ids = tok.encode("hi there")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("hi there", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == BOS + "hi there"
    # a tokenizer.json whose post-processor already adds BOS must not get a second one
    write_test_tokenizer(tmp_path, bos_post_processor=True)
    with_pp = Tokenizer.from_pretrained(tmp_path)
    assert with_pp.encode("hi there") == ids
    # nor does a chat-templated prompt that starts with the BOS string
    prompt_ids = tok.encode(tok.apply_chat_template(CHAT))
    assert prompt_ids.count(tok.bos_token_id) == 1 and prompt_ids[0] == tok.bos_token_id


def test_folder_without_tokenizer_json_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_pretrained(tmp_path) is None


def _split_characters(tok, ids):
    """Tokens that hold only part of a multi-byte character decode to U+FFFD on their own."""
    return [i for i in ids if "\ufffd" in tok.decode([i])]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_never_breaks_a_character_and_matches_decode(tok, chunk):
    prompt = tok.encode("User: say something\n\nAssistant:")
    generated = tok.encode(" " + MIXED + " 😀😀 你好", add_special_tokens=False) + [tok.eos_token_id]
    assert _split_characters(tok, generated), "the test text must split characters across tokens"
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(generated[i:i + chunk]) for i in range(0, len(generated), chunk)]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # something was held back until its character completed
    assert "".join(deltas) == detok.text == tok.decode(generated) == " " + MIXED + " 😀😀 你好"


def test_streaming_decodes_a_bounded_window(tok):
    calls = []
    decode = tok.decode

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return decode(ids, skip_special_tokens)

    generated = tok.encode(MIXED * 6, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting(), tok.encode("prompt " * 20))
    for i in generated:
        detok.push([i])
    assert detok.text == MIXED * 6
    assert max(calls) <= 12, f"decoded windows up to {max(calls)} tokens for a {len(generated)}-token output"


def test_flush_emits_a_trailing_partial_character(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    out = detok.push(ids[:-1])
    assert "\ufffd" not in out
    assert out + detok.flush() == tok.decode(ids[:-1])  # ends in U+FFFD, as decode() does


def test_chat_template_renders_reference_example(tok):
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True) == CHAT_EXPECTED
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == CHAT_EXPECTED[: -len("Assistant:")]


def test_chat_template_matches_transformers(folder, tok):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    for gen in (True, False):
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == ref.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=gen)
    # the environment too: tojson without HTML escaping, loop controls, trim/lstrip blocks, extra kwargs
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\n"
                "  {{ m | tojson }}|{{ greeting }}\n  {% endfor %}")
    ours = Tokenizer.from_pretrained(folder)
    ours.chat_template, ref.chat_template = template, template
    rendered = ours.apply_chat_template(CHAT, greeting="<&>")
    assert rendered == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, greeting="<&>")
    assert rendered.count("\n") == 2 and "你好" in rendered and "<&>" in rendered


def test_missing_chat_template_raises(tmp_path):
    write_test_tokenizer(tmp_path, template=False)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CHAT)


@pytest.mark.parametrize("messages, match", [
    ([{"content": "no role"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": None}], "content"),
    (["just a string"], "dict"),
    ([], "non-empty"),
])
def test_malformed_messages_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_errors_become_value_errors(folder):
    tok = Tokenizer.from_pretrained(folder)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(CHAT)
    tok.chat_template = "{% for m in messages %}unclosed"
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(CHAT)
