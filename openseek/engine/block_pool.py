"""Cache blocks with reference counts, and prefix caching by chained hashes of full blocks.

Pure Python. A block holds `block_size` tokens' latents in every layer. A full block's hash chains its
parent's hash with its token ids, so equal hashes mean equal prefixes. Freed blocks keep their hash and
stay findable until they are reused (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT = bytes(32)  # the parent of a prompt's first block


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """sha256 of the parent block's hash and this block's token ids (int64), as vLLM chains its block hashes.

    A collision means serving another prompt's cache, so the hash is collision-resistant: Python's 64-bit hash()
    is not (hash(-1) == hash(-2), and tuple hashes can be solved for), and the digest costs ~1 us a block.
    """
    return hashlib.sha256((parent or ROOT) + array("q", token_ids).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        # Blocks with no user, oldest first; a cached one among them can still be revived by a prefix hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently freed cached blocks if needed."""
        if n > len(self.free):
            raise RuntimeError(f"cannot allocate {n} blocks: {len(self.free)} free")  # callers check num_free
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if (h := self.hash_of[b]) is not None:
                del self.cached[h]
                self.hash_of[b] = None
            self.ref_count[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        # Tail blocks first, so a sequence's prefix is evicted last.
        for b in reversed(blocks):
            assert self.ref_count[b] > 0, f"block {b} released twice"
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks for the longest run of leading hashes; each gains a reference."""
        out = []
        if not self.enable_prefix_caching:
            return out
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
            out.append(b)
        return out

    def count_hits(self, hashes: list[bytes]) -> tuple[int, int]:
        """(leading hashes cached, how many of those blocks are currently free) without taking them."""
        hits = free_hits = 0
        if self.enable_prefix_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                hits += 1
                free_hits += self.ref_count[b] == 0
        return hits, free_hits

    def register(self, block: int, h: bytes) -> None:
        """Mark a just-filled block as holding the prefix with hash h."""
        if not self.enable_prefix_caching or h in self.cached or self.hash_of[block] is not None:
            return
        self.cached[h] = block
        self.hash_of[block] = h

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; blocks in use keep their contents, only their findability goes."""
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks if self.num_blocks else 0.0
