"""Pre-training data: a text corpus, a hash-based train/validation split, the token stream packed into memory-mapped
shards, and a seeded, resumable, rank-sharded window loader. The tokenizer is trained in bpe.py.

Shapes: B sequences per batch (per rank), S tokens per sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .loss import IGNORE_INDEX  # the padded targets of the last validation batch

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json")
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})  # and hidden folders (.git, .venv)
PACK_FORMAT = 1  # bump when the shard layout changes, so old packs are rebuilt


# ---- corpus and split ------------------------------------------------------------------------------

def corpus_files(paths: list[str] | None = None) -> list[Path]:
    """UTF-8 text files under paths (folders walked for *.py/txt/md/rst/json), or by default the running interpreter's
    standard library *.py; non-UTF-8 files are skipped with a logged warning."""
    if paths is None:
        roots, suffixes = [Path(sysconfig.get_paths()["stdlib"])], (".py",)
    elif isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a list of files or folders, got the single path {paths!r}")
    elif not paths:
        raise ValueError("paths is empty: give at least one text file or folder (or None for the standard library)")
    else:
        roots, suffixes = [Path(p) for p in paths], TEXT_SUFFIXES
    files, seen = [], set()
    for root in roots:
        if not root.exists():
            raise ValueError(f"corpus path {root} does not exist")
        found = [root] if root.is_file() else _walk(root, suffixes)
        if not found:
            raise ValueError(f"corpus folder {root} holds no {'/'.join(s[1:] for s in suffixes)} files")
        for f in found:
            if f.resolve() not in seen and _is_utf8(f):
                seen.add(f.resolve())
                files.append(f.absolute())
    if not files:
        raise ValueError(f"no UTF-8 text files under {', '.join(map(str, roots))}")
    return files


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder) / name for name in filenames if name.endswith(suffixes)]
    return sorted(found)  # by path components: the same order on every file system


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        log.warning("skipping %s: not UTF-8 text (%s)", path, e)
        return False


def _read_text(path: Path) -> str:
    try:  # bytes, not read_text(): no newline translation, so len(text.encode()) is the file's size
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({e})") from None


def split_files(files: list[Path], val_fraction: float = 0.02, seed: int = 0,
                root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, validation): a file is held out iff sha256(seed, its path under root) falls under val_fraction.

    root defaults to the deepest folder holding every file, so a corpus copied elsewhere splits the same way. When the
    rule holds out nothing (a small corpus), the file with the lowest hash is held out so bits per byte can be reported.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1)")
    files = [Path(f).absolute() for f in files]
    if not files:
        raise ValueError("split_files got no files")
    root = Path(root).absolute() if root is not None else Path(os.path.commonpath([f.parent for f in files]))
    draws = []
    for f in files:
        if not f.is_relative_to(root):
            raise ValueError(f"corpus file {f} is not under the split root {root}")
        key = f"{seed}\0{f.relative_to(root).as_posix()}".encode()
        draws.append(int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64)  # uniform in [0, 1)
    held_out = {i for i, u in enumerate(draws) if u < val_fraction}
    if val_fraction > 0 and not held_out and len(files) > 1:
        held_out = {min(range(len(files)), key=draws.__getitem__)}
    if len(held_out) == len(files) and len(files) > 1:  # keep something to train on
        held_out.remove(max(held_out, key=draws.__getitem__))
    return ([f for i, f in enumerate(files) if i not in held_out], [f for i, f in enumerate(files) if i in held_out])


# ---- packing ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class PackedDataset:
    """The token stream of one split in memory-mapped shards; all shards but the last hold shard_tokens tokens."""

    folder: Path
    dtype: str
    shard_tokens: int
    shard_sizes: list[int]
    num_bytes: int  # UTF-8 bytes of the text: bits per byte = nats / ln 2 / num_bytes
    num_docs: int
    vocab_size: int
    fingerprint: str
    _maps: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.shard_sizes)

    def __len__(self) -> int:
        return self.num_tokens

    @classmethod
    def load(cls, folder: str | Path) -> PackedDataset:
        """The dataset pack_tokens wrote to folder; ValueError when its index or shards are missing or truncated."""
        folder = Path(folder)
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder} holds no readable packed dataset index ({e}); run pack_tokens") from None
        if index.get("format") != PACK_FORMAT:
            raise ValueError(f"{folder}/index.json has format {index.get('format')!r}, expected {PACK_FORMAT}")
        itemsize = np.dtype(index["dtype"]).itemsize
        for i, n in enumerate(index["shard_sizes"]):
            path = folder / _shard_name(i)
            if not path.is_file() or path.stat().st_size != n * itemsize:
                raise ValueError(f"shard {path} is missing or is not {n} tokens long; run pack_tokens again")
        return cls(folder, index["dtype"], index["shard_tokens"], index["shard_sizes"], index["num_bytes"],
                   index["num_docs"], index["vocab_size"], index["fingerprint"])

    def num_windows(self, seq_len: int, cover_tail: bool = False) -> int:
        """Windows of S+1 tokens (overlapping by one) in the stream; cover_tail counts a final partial one too."""
        if cover_tail:
            return max(math.ceil((self.num_tokens - 1) / seq_len), 1)
        return (self.num_tokens - 1) // seq_len

    def windows(self, indices: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets) of windows `indices`; a window past the stream's end is all padding."""
        return _windows(self, [min(w * seq_len, self.num_tokens) for w in indices], seq_len)

    @property
    def num_targets(self) -> int:
        return self.num_tokens - 1  # every token after the first

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens [start, stop) of the stream, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) is outside the stream of {self.num_tokens} tokens")
        parts = [np.empty(0, self.dtype)]
        while start < stop:
            shard, offset = divmod(start, self.shard_tokens)
            take = min(stop - start, self.shard_sizes[shard] - offset)
            parts.append(self._shard(shard)[offset:offset + take])
            start += take
        return np.concatenate(parts)

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.folder / _shard_name(i), dtype=self.dtype, mode="r",
                                      shape=(self.shard_sizes[i],))
        return self._maps[i]


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def pack_tokens(files: list[Path], tokenizer: Tokenizer, out_dir: str | Path,
                shard_tokens: int = 2**26) -> PackedDataset:
    """Write [BOS] + tokens + [EOS] of each file, concatenated, into out_dir's shards and index.json; reuse them when
    the files' contents, their order, the tokenizer and shard_tokens are unchanged."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("pack_tokens needs a tokenizer with bos_token and eos_token (tokenizer_config.json)")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens!r} must be an int >= 1")
    if not files:
        raise ValueError("pack_tokens got no files")
    out = Path(out_dir)
    fingerprint = _fingerprint(files, tokenizer, shard_tokens)
    reused = _load_if_current(out, fingerprint)
    if reused is not None:
        return reused
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # first, so a crash mid-pack never leaves a valid-looking index
    for old in out.glob("shard-*.bin"):
        old.unlink()
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    pending, count, sizes, num_bytes = [], 0, [], 0
    for f in files:
        text = _read_text(f)
        num_bytes += len(text.encode())
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        pending.append(np.asarray(ids, dtype))
        count += len(ids)
        while count >= shard_tokens:
            stream = np.concatenate(pending)
            stream[:shard_tokens].tofile(out / _shard_name(len(sizes)))
            sizes.append(shard_tokens)
            pending, count = [stream[shard_tokens:]], count - shard_tokens
    if count:
        np.concatenate(pending).tofile(out / _shard_name(len(sizes)))
        sizes.append(count)
    index = {"format": PACK_FORMAT, "fingerprint": fingerprint, "dtype": dtype.name, "shard_tokens": shard_tokens,
             "shard_sizes": sizes, "num_tokens": sum(sizes), "num_bytes": num_bytes, "num_docs": len(files),
             "vocab_size": tokenizer.vocab_size}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    log.info("packed %d files into %d tokens (%d bytes of text) in %s", len(files), sum(sizes), num_bytes, out)
    return PackedDataset.load(out)


def _fingerprint(files: list[Path], tokenizer: Tokenizer, shard_tokens: int) -> str:
    h = hashlib.sha256(json.dumps([PACK_FORMAT, shard_tokens, tokenizer.bos_token_id,
                                   tokenizer.eos_token_id]).encode())
    # the serialized backend (vocabulary, merges, pre-tokenizer) decides every id; Tokenizer exposes no public form
    h.update(hashlib.sha256(tokenizer._tok.to_str().encode()).digest())
    for f in files:  # contents in order, not paths or mtimes: a moved or touched corpus still reuses its shards
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()


def _load_if_current(out: Path, fingerprint: str) -> PackedDataset | None:
    if not (out / "index.json").is_file():
        return None
    try:
        dataset = PackedDataset.load(out)
    except (ValueError, KeyError) as e:
        log.info("rebuilding %s: %s", out, e)
        return None
    if dataset.fingerprint != fingerprint:
        log.info("rebuilding %s: the files or the tokenizer changed", out)
        return None
    log.info("reusing the %d packed tokens in %s", dataset.num_tokens, out)
    return dataset


# ---- loading ---------------------------------------------------------------------------------------

def _check_batching(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by world_size={world_size}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must lie in [0, world_size={world_size})")


def _windows(dataset: PackedDataset, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets) of S+1-token windows starting at starts; a window cut by the stream's end is padded."""
    inputs = torch.zeros(len(starts), seq_len, dtype=torch.int64)  # padding ids: causal attention hides them
    targets = torch.full((len(starts), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for row, start in enumerate(starts):
        chunk = torch.from_numpy(dataset.read(start, min(start + seq_len + 1, dataset.num_tokens)).astype(np.int64))
        n = max(len(chunk) - 1, 0)
        inputs[row, :n] = chunk[:n]
        targets[row, :n] = chunk[1:n + 1]  # the next token at every position
    return inputs, targets  # (B, S), (B, S)


class TokenLoader:
    """Endless (input_ids, targets) batches: non-overlapping windows of S+1 tokens in a seeded order, a new
    permutation of all windows each epoch (of a PackedDataset, or the packed rows of an sft.ChatDataset).
    batch_size is the global batch; rank r of world_size gets the contiguous rows [r*b, (r+1)*b),
    b = batch_size // world_size, so the ranks together see one process's batch."""

    def __init__(self, dataset, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        _check_batching(batch_size, seq_len, rank, world_size)
        self.num_windows = dataset.num_windows(seq_len)
        if self.num_windows < 1:
            raise ValueError(f"{dataset.folder} holds no full window of seq_len + 1 = {seq_len + 1} tokens")
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.rank, self.local_batch_size = rank, batch_size // world_size
        self.epoch, self.position = 0, 0  # the next window is permutation(epoch)[position]
        self._order: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            key = hashlib.sha256(f"{self.seed}\0{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "big") >> 1)
            self._order = (epoch, torch.randperm(self.num_windows, generator=g))
        return self._order[1]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = []  # the global batch; it may run over into the next epoch, so no window is ever dropped
        while len(windows) < self.batch_size:
            take = min(self.batch_size - len(windows), self.num_windows - self.position)
            windows += self._permutation(self.epoch)[self.position:self.position + take].tolist()
            self.position += take
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        mine = windows[self.rank * self.local_batch_size:(self.rank + 1) * self.local_batch_size]
        return self.dataset.windows(mine, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict(): the next batch is the one the saved loader would have yielded next."""
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) \
                or not 0 <= position < self.num_windows:
            raise ValueError(f"loader state {state!r} needs int epoch >= 0 and position in [0, {self.num_windows})")
        self.epoch, self.position = epoch, position


def validation_batches(dataset, batch_size: int, seq_len: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole stream once, in order, in fixed-shape batches (rows split across ranks as in TokenLoader): every
    token after the first is a target exactly once; the tail is padded with targets IGNORE_INDEX."""
    _check_batching(batch_size, seq_len, rank, world_size)
    num_windows = dataset.num_windows(seq_len, cover_tail=True)
    local = batch_size // world_size
    for first in range(0, num_windows, batch_size):
        # rows past the end are all padding, so every rank runs the same number of batches
        yield dataset.windows(list(range(first + rank * local, first + (rank + 1) * local)), seq_len)


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Cross-entropy summed over a split's targets, in bits per UTF-8 byte of its text (tokenizer-independent)."""
    if num_bytes < 1:
        raise ValueError(f"num_bytes={num_bytes!r} must be >= 1")
    return total_nats / math.log(2) / num_bytes
