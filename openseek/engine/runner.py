"""The one engine file that touches tensors: the latent cache, batch tensors, the forward pass.

Shapes: N packed new tokens, B sequences, P blocks per sequence, V vocabulary.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..model.batch import ForwardBatch
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        cfg = model.config
        self.model, self.block_size = model, block_size
        # The latent cache and nothing else: per layer and token, c_kv (C) and the rotated k_pe (R).
        self.kv_cache = torch.zeros(cfg.num_hidden_layers, num_blocks * block_size, cfg.kv_cache_dim,
                                    dtype=model.dtype, device=model.device)

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the scheduled tokens; logits (S, V) float32 of the sequences that sample, in batch order."""
        L = self.block_size
        ids, positions, slots, last = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed
            ids += [seq.token_at(p) for p in range(start, start + n)]
            positions += range(start, start + n)
            slots += [seq.block_table[p // L] * L + p % L for p in range(start, start + n)]
            if batch.samples[i]:
                last.append(len(ids) - 1)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        dev = self.kv_cache.device
        fb = ForwardBatch(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            context_lens=[seq.num_computed + n for seq, n in zip(batch.seqs, batch.num_new)],
            query_lens=list(batch.num_new),
            num_decodes=batch.num_decodes,
            block_size=L,
        )
        h = self.model.hidden_states_paged(torch.tensor(ids, dtype=torch.long, device=dev), fb, self.kv_cache)  # (N, D)
        if not last:
            return h.new_empty(0, self.model.config.vocab_size, dtype=torch.float32)
        return self.model.logits(h[torch.tensor(last, device=dev)]).float()  # (S, V)
