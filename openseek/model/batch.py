"""ForwardBatch: what the engine tells the model about a packed batch over the paged latent cache.

The batch packs N new tokens of B sequences back to back: first the decode sequences (one token each),
then the prefill chunks. Shapes: N tokens, B sequences, P blocks per sequence (padded), T cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    positions: torch.Tensor  # (N,) int64: position of each new token in its sequence
    slot_mapping: torch.Tensor  # (N,) int64: cache row (block * block_size + offset) each new token is written to
    block_tables: torch.Tensor  # (B, P) int64: cache blocks of each sequence, padded with 0
    context_lens: list[int]  # (B,) tokens in the cache after this step, new ones included
    query_lens: list[int]  # (B,) new tokens of each sequence in this batch
    num_decodes: int  # the first num_decodes sequences have query_len 1 and are decoded together
    block_size: int
    # derived once per step, not once per layer: the decodes' cache rows padded to the longest context, and the
    # mask of the real ones (None when every context has the same length)
    decode_slots: torch.Tensor | None = None  # (num_decodes, T) int64
    decode_mask: torch.Tensor | None = None  # (num_decodes, 1, T) bool

    def __post_init__(self) -> None:
        nd = self.num_decodes
        if nd:
            lens = self.context_lens[:nd]
            T = max(lens)
            t = torch.arange(T, device=self.block_tables.device)
            self.decode_slots = self._slots(self.block_tables[:nd], t)
            if min(lens) < T:
                self.decode_mask = (t[None] < torch.tensor(lens, device=t.device)[:, None])[:, None]

    def gather_slots(self, seq: int, length: int) -> torch.Tensor:
        """Cache rows holding tokens 0..length-1 of sequence `seq`. -> (length,)"""
        return self._slots(self.block_tables[seq], torch.arange(length, device=self.block_tables.device))

    def _slots(self, tables: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Cache rows of token positions t under block tables (..., P). -> (..., len(t))"""
        return tables[..., t // self.block_size] * self.block_size + t % self.block_size

