"""The output processor alone: tokens in, deltas out, against the tokenizer's own decode()."""

from __future__ import annotations

import pytest

from openseek.engine import SamplingParams
from openseek.engine.output_processor import RequestState
from openseek.engine.sequence import Sequence
from openseek.tokenizer import Tokenizer
from tokenizers_util import write_test_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_test_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def feed(tok, text: str, params: SamplingParams, n: int = 1):
    """Push text's tokens one at a time into completion 0 of a fresh request; the deltas and the state."""
    prompt = tok.encode("User: hi\n\nAssistant:")
    seqs = [Sequence("r", prompt, max_tokens=params.max_tokens or 1000, index=j) for j in range(n)]
    state = RequestState("r", None, params, seqs, tok)
    deltas = []
    for t in tok.encode(text, add_special_tokens=False):
        seqs[0].output_ids.append(t)
        deltas.append(state.append(0, t, None, tok.eos_token_id))
        if deltas[-1].finished:
            break
    return deltas, state


def test_a_stream_never_shows_text_a_stop_string_later_removes(tok):
    text = " The quick brown fox. STOP here, never shown"
    deltas, _ = feed(tok, text, SamplingParams(stop=["STOP", "xyz"], max_tokens=None))
    shown = ""
    final = text[:text.index("STOP")]
    for d in deltas:
        shown += d.new_text
        assert final.startswith(shown), shown  # nothing is ever taken back
    assert shown == final and deltas[-1].finish_reason == "stop" and deltas[-1].output.outputs[0].text == final


def test_a_length_stop_mid_character_flushes_what_decode_shows(tok):
    text = " ok 😀"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, _ = feed(tok, text, SamplingParams(max_tokens=len(ids) - 1))
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.new_text for d in deltas) == tok.decode(ids[:-1])  # ends in U+FFFD, as decode() does
    assert deltas[-1].output.outputs[0].text == tok.decode(ids[:-1])


def test_the_request_output_comes_once_its_last_completion_finishes(tok):
    deltas, state = feed(tok, " a b c", SamplingParams(n=2, max_tokens=2), n=2)
    assert deltas[-1].finished and deltas[-1].output is None  # completion 1 still runs
    for t in (5, 6):
        state.seqs[1].output_ids.append(t)
        last = state.append(1, t, None, None)
    assert last.output is not None and [c.finish_reason for c in last.output.outputs] == ["length", "length"]
    assert last.output.outputs[1].token_ids == [5, 6]
