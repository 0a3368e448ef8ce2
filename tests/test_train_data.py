"""Pre-training data: corpus, hash split, byte-level BPE, packed shards, resumable rank-sharded loader, bpb."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as Backend

from openseek.tokenizer import Tokenizer
from openseek.train.bpe import BOS, CHAT_TEMPLATE, EOS, train_tokenizer
from openseek.train.loss import IGNORE_INDEX
from openseek.train.data import (PackedDataset, TokenLoader, bits_per_byte, corpus_files, pack_tokens,
                                 split_files, validation_batches)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = {
    "a/prose.txt": "The quick brown fox jumps over the lazy dog. " * 20 + "\nA second line, café naïve.\n",
    "a/windows.txt": "carriage returns\r\nstay exactly\r\nas written\r\n",
    "a/code.py": "def forward(self, x):\n    return self.proj(x) + x\n\n\nclass Block:\n    pass\n" * 5,
    "b/cjk.md": "# 标题\n\n你好，世界！深度求索的模型支持中文和英文。今天天气很好。日本語のテキスト。\n" * 5,
    "b/emoji.rst": "Emoji: 😀 🚀 🎉 👍 — and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 beyond the BMP.\n" * 5,
    "b/sub/data.json": json.dumps({"numbers": list(range(50)), "text": "json too"}),
}
IGNORED = {"b/image.bin": b"\x00\x01", ".git/notes.txt": b"hidden", "a/__pycache__/code.py": b"cached"}
STDLIB_SAMPLE = ["textwrap.py", "json/decoder.py", "colorsys.py"]
MIXED = ["Hello, world! 你好，世界。 Emoji 😀🚀🎉 and 日本語; café — done.", "\t  indented\r\n\x00 nul \U0010ffff",
         "", " leading space", "🧑‍🧑‍🧒 family ZWJ and ﷽"]


def write_corpus(root: Path) -> Path:
    for rel, text in TEXTS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode())
    for rel, data in IGNORED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for name in STDLIB_SAMPLE:
        (root / "std" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / name, root / "std" / name)
    (root / "a" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def stream_of(folder: Path) -> np.ndarray:
    index = json.loads((folder / "index.json").read_text())
    shards = sorted(folder.glob("shard-*.bin"))
    assert len(shards) == len(index["shard_sizes"])
    return np.concatenate([np.fromfile(s, dtype=index["dtype"]) for s in shards]).astype(np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def files(corpus) -> list[Path]:
    return corpus_files([str(corpus)])


@pytest.fixture(scope="module")
def tok_dir(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(files, vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def packed(files, tok, tmp_path_factory) -> PackedDataset:
    return pack_tokens(files, tok, tmp_path_factory.mktemp("packed"), shard_tokens=1000)


# ---- corpus and split ------------------------------------------------------------------------------

def test_corpus_walks_folders_for_text_files_in_sorted_order_and_skips_non_utf8(corpus, caplog):
    with caplog.at_level(logging.WARNING):
        found = corpus_files([str(corpus)])
    expected = sorted([*TEXTS, *(f"std/{n}" for n in STDLIB_SAMPLE)], key=lambda rel: Path(rel).parts)
    assert [f.relative_to(corpus).as_posix() for f in found] == expected
    assert all(f.is_absolute() for f in found)
    assert "latin1.txt" in caplog.text and "not UTF-8" in caplog.text
    # a file named explicitly is taken whatever its suffix; repeats are dropped
    again = corpus_files([str(corpus / "b/image.bin"), str(corpus / "a"), str(corpus / "a/code.py")])
    assert [f.name for f in again] == ["image.bin", "code.py", "prose.txt", "windows.txt"]


def test_corpus_rejects_missing_paths_and_folders_without_text(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        corpus_files([str(tmp_path / "nope")])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="holds no"):
        corpus_files([str(tmp_path / "bin")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="no UTF-8"):
        corpus_files([str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="empty"):
        corpus_files([])
    with pytest.raises(TypeError, match="list"):
        corpus_files(str(tmp_path))


def test_default_corpus_is_the_interpreters_standard_library_python():
    found = corpus_files(None)
    assert len(found) > 500 and found == sorted(found)
    assert all(f.suffix == ".py" and f.is_relative_to(STDLIB) for f in found)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in found)
    assert STDLIB / "textwrap.py" in found and STDLIB / "json" / "decoder.py" in found


def held_out_by_rule(names: list[str], fraction: float, seed: int) -> set[str]:
    def draw(name):
        return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64
    return {n for n in names if draw(n) < fraction}


def test_split_is_a_stable_hash_of_the_relative_path_wherever_the_corpus_lives(tmp_path):
    names = [f"docs/part{i % 7}/doc{i}.txt" for i in range(2000)]
    here = [tmp_path / "one" / n for n in names]
    train, val = split_files(here, val_fraction=0.05, seed=3)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(here)
    expected = held_out_by_rule([n.split("/", 1)[1] for n in names], 0.05, 3)  # relative to the common folder docs/
    assert {f.relative_to(tmp_path / "one" / "docs").as_posix() for f in val} == expected
    assert 50 < len(val) < 150
    assert split_files(here, val_fraction=0.05, seed=3) == (train, val)
    elsewhere = split_files([tmp_path / "other" / "place" / n for n in names], val_fraction=0.05, seed=3)[1]
    assert [f.name for f in elsewhere] == [f.name for f in val]
    assert split_files(here, val_fraction=0.05, seed=4)[1] != val


def test_split_holds_out_the_lowest_hash_when_the_fraction_selects_nothing(tmp_path):
    names = ["a.txt", "b.txt", "c.txt"]
    train, val = split_files([tmp_path / n for n in names], val_fraction=1e-12, seed=0)
    lowest = min(names, key=lambda n: hashlib.sha256(f"0\0{n}".encode()).digest())
    assert [f.name for f in val] == [lowest] and len(train) == 2
    assert split_files([tmp_path / n for n in names], val_fraction=0.0)[1] == []
    assert len(split_files([tmp_path / n for n in names], val_fraction=0.999999)[0]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_files([tmp_path / "a.txt"], val_fraction=1.0)


# ---- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_round_trips_any_utf8_and_puts_bos_eos_last(tok, tok_dir):
    assert tok.vocab_size == 400
    assert (tok.bos_token_id, tok.eos_token_id) == (398, 399)
    assert tok.id_to_token(398) == BOS == "<｜begin▁of▁sentence｜>" and tok.id_to_token(399) == EOS
    rng = random.Random(0)
    noise = "".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(300))
    for text in MIXED + [noise]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert tok.decode(ids) == text
    # merges were learned from the corpus: common text takes fewer tokens than bytes
    assert len(tok.encode(TEXTS["a/prose.txt"], add_special_tokens=False)) < 0.7 * len(TEXTS["a/prose.txt"])


def test_tokenizer_folder_has_deepseek_v2_config_and_chat_template(tok, tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["model_max_length"] == 16384
    assert config["bos_token"]["content"] == BOS and config["eos_token"]["content"] == EOS
    assert config["chat_template"] == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "你好"}])
    assert prompt == f"{BOS}Be brief.\n\nUser: Hi\n\nAssistant: Hello{EOS}User: 你好\n\nAssistant:"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and tok.eos_token_id in ids


def test_tokenizer_training_is_deterministic_and_honours_the_byte_budget(files, tok_dir, tmp_path):
    train_tokenizer(files, vocab_size=400, out_dir=tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    small = train_tokenizer(files, vocab_size=2000, out_dir=tmp_path / "small", max_bytes=3000)
    assert small.vocab_size < 2000  # 3 KB of text runs out of merges
    assert small.id_to_token(small.vocab_size - 1) == EOS
    assert small.decode(small.encode(MIXED[0])) == MIXED[0]


def test_exact_tokenizer_training_refuses_a_short_sample_and_writes_nothing(files, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=2000: the corpus sample ran out of merges at (\d+) tokens"):
        train_tokenizer(files, vocab_size=2000, out_dir=tmp_path / "exact", max_bytes=3000, exact=True)
    assert not (tmp_path / "exact").exists()


@pytest.mark.parametrize("vocab_size", [258, 100, 400.0])
def test_tokenizer_rejects_too_small_a_vocabulary(files, tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(files, vocab_size=vocab_size, out_dir=tmp_path)


# ---- packing ---------------------------------------------------------------------------------------

def encode_directly(files: list[Path], tok_dir: Path) -> list[int]:
    """[BOS] + ids + [EOS] per file, concatenated, with the tokenizers library alone."""
    backend = Backend.from_file(str(tok_dir / "tokenizer.json"))
    bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
    texts = [open(f, encoding="utf-8", newline="").read() for f in files]
    return [i for t in texts for i in [bos, *backend.encode(t, add_special_tokens=False).ids, eos]]


def test_packed_stream_is_the_concatenated_encoding_of_every_file(packed, files, tok_dir):
    expected = encode_directly(files, tok_dir)
    texts = [open(f, encoding="utf-8", newline="").read() for f in files]
    stream = stream_of(packed.folder)
    assert stream.tolist() == expected
    assert len(packed.shard_sizes) > 1 and packed.shard_sizes[:-1] == [1000] * (len(packed.shard_sizes) - 1)
    assert packed.dtype == "uint16" and packed.num_tokens == len(expected) and packed.num_docs == len(files)
    assert packed.num_bytes == sum(len(t.encode()) for t in texts)  # \r\n kept: the file's own bytes
    assert packed.read(990, 1010).tolist() == expected[990:1010]  # across a shard boundary
    assert PackedDataset.load(packed.folder) == packed


def test_repacking_reuses_shards_until_a_file_or_the_layout_changes(tok, tok_dir, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    files = corpus_files([str(root)])
    first = pack_tokens(files, tok, tmp_path / "out", shard_tokens=500)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    second = pack_tokens(files, tok, tmp_path / "out", shard_tokens=500)
    assert second == first and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes

    (root / "a" / "prose.txt").write_text("Changed text.\n", encoding="utf-8")
    third = pack_tokens(files, tok, tmp_path / "out", shard_tokens=500)
    assert third.fingerprint != first.fingerprint and third.num_tokens < first.num_tokens
    assert stream_of(tmp_path / "out").tolist() == encode_directly(files, tok_dir)

    fewer = pack_tokens(files, tok, tmp_path / "out", shard_tokens=100_000)  # stale shards are removed
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.bin")) == ["shard-00000.bin"]
    assert fewer.read(0, fewer.num_tokens).tolist() == encode_directly(files, tok_dir)


def test_a_truncated_shard_is_reported_and_rebuilt(files, tok, tmp_path):
    pack_tokens(files, tok, tmp_path, shard_tokens=700)
    with open(tmp_path / "shard-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="shard-00000.bin"):
        PackedDataset.load(tmp_path)
    rebuilt = pack_tokens(files, tok, tmp_path, shard_tokens=700)
    assert rebuilt.shard_sizes[0] == 700
    with pytest.raises(ValueError, match="index"):
        PackedDataset.load(tmp_path / "missing")


# ---- loading ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> PackedDataset:
    """A stream 0, 1, 2, ... in shards of 1000: every window is told apart by its first token."""
    folder, n = tmp_path_factory.mktemp("counting"), 4321
    stream = np.arange(n, dtype=np.uint16)
    sizes = [len(stream[i:i + 1000]) for i in range(0, n, 1000)]
    for k, i in enumerate(range(0, n, 1000)):
        stream[i:i + 1000].tofile(folder / f"shard-{k:05d}.bin")
    return PackedDataset(folder, "uint16", 1000, sizes, num_bytes=n, num_docs=1, vocab_size=n, fingerprint="")


def test_targets_are_inputs_shifted_by_one_from_contiguous_windows(counting):
    S = 32
    x, y = next(TokenLoader(counting, batch_size=4, seq_len=S, seed=0))
    assert x.shape == y.shape == (4, S) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert start % S == 0  # non-overlapping windows
        assert row_x.tolist() == list(range(start, start + S))
        assert row_y.tolist() == list(range(start + 1, start + S + 1))


def test_each_epoch_is_a_fresh_permutation_of_all_windows(counting):
    S = 64
    n = (counting.num_tokens - 1) // S
    loader = TokenLoader(counting, batch_size=1, seq_len=S, seed=5)
    starts = [int(next(loader)[0][0, 0]) for _ in range(2 * n)]
    assert sorted(starts[:n]) == sorted(starts[n:]) == [i * S for i in range(n)]
    assert starts[:n] != starts[n:] and loader.state_dict() == {"epoch": 2, "position": 0}
    assert [int(next(loader)[0][0, 0]) for _ in range(n)] not in (starts[:n], starts[n:])
    again = TokenLoader(counting, batch_size=1, seq_len=S, seed=5)
    assert [int(next(again)[0][0, 0]) for _ in range(n)] == starts[:n]
    other = TokenLoader(counting, batch_size=1, seq_len=S, seed=6)
    assert [int(next(other)[0][0, 0]) for _ in range(n)] != starts[:n]


def test_resuming_after_k_batches_yields_the_uninterrupted_sequence(counting):
    S, B = 48, 7
    n = (counting.num_tokens - 1) // S
    total = 3 * n // B + 2  # over several epochs, with batches that straddle epoch ends
    full = TokenLoader(counting, B, S, seed=1)
    reference = [next(full) for _ in range(total)]
    for k in (0, 1, n // B, n // B + 1, total - 1):
        head = TokenLoader(counting, B, S, seed=1)
        for _ in range(k):
            next(head)
        state = json.loads(json.dumps(head.state_dict()))  # survives a checkpoint
        resumed = TokenLoader(counting, B, S, seed=1)
        resumed.load_state_dict(state)
        for want, got in zip(reference[k:], (next(resumed) for _ in range(total - k))):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_see_the_single_process_global_batch(counting, world_size):
    B, S = 6, 40
    single = TokenLoader(counting, B, S, seed=2)
    ranks = [TokenLoader(counting, B, S, seed=2, rank=r, world_size=world_size) for r in range(world_size)]
    seen = []
    for _ in range(30):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        seen += x[:, 0].tolist()
        assert all(p[0].shape == (B // world_size, S) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(r.state_dict() == single.state_dict() for r in ranks)
    n = (counting.num_tokens - 1) // S
    assert sorted(seen[:n]) == [i * S for i in range(n)]  # the first epoch, split across ranks, covers each window


@pytest.mark.parametrize("world_size", [1, 2])
def test_validation_predicts_every_token_after_the_first_exactly_once(packed, world_size):
    stream, B, S = stream_of(packed.folder), 4, 50
    per_rank = [list(validation_batches(packed, B, S, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank runs the same number of batches
    targets, inputs = [], []
    for step in zip(*per_rank):
        x = torch.cat([x for x, _ in step])
        y = torch.cat([y for _, y in step])
        assert x.shape == y.shape == (B, S)
        keep = y != IGNORE_INDEX
        targets += y[keep].tolist()
        inputs += x[keep].tolist()
    assert targets == stream[1:].tolist() and inputs == stream[:-1].tolist()


def test_bits_per_byte_converts_summed_nats():
    assert bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0)
    assert bits_per_byte(3.0, 2) == pytest.approx(3.0 / math.log(2) / 2)
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_byte(1.0, 0)


def test_loader_rejects_bad_batching_and_states(packed):
    with pytest.raises(ValueError, match="divisible"):
        TokenLoader(packed, batch_size=5, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(packed, batch_size=4, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(packed, batch_size=4, seq_len=packed.num_tokens)
    with pytest.raises(ValueError, match="position"):
        TokenLoader(packed, batch_size=4, seq_len=8).load_state_dict({"epoch": 0, "position": 10**9})
