"""The one engine file that touches tensors: the latent cache, batch tensors, the forward pass.

Shapes: N packed new tokens, B sequences, S new tokens of one sequence, D model dim, V vocabulary, C latent,
R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer
from ..model.batch import ForwardBatch
from .scheduler import ScheduledBatch


@dataclass(slots=True)
class RunOutput:
    sample_logits: torch.Tensor  # (B, V) float32, one row per sequence that samples, in batch order
    chunk_logits: dict[int, torch.Tensor]  # batch index -> (S, V) float32 for every token of its prefill chunk


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        cfg = model.config
        self.model, self.block_size = model, block_size
        model.absorb_weights()  # the absorbed path's W_UK / W_UV^T, built once from the loaded weights
        # The latent cache and nothing else: per layer and token, c_kv (C) and the rotated k_pe (R).
        self.kv_cache = torch.zeros(cfg.num_hidden_layers, num_blocks * block_size, cfg.kv_cache_dim,
                                    dtype=model.dtype, device=model.device)

    @property
    def cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunOutput:
        """Run the scheduled tokens: logits of the sequences that sample, and of whole chunks where asked."""
        L = self.block_size
        ids, positions, slots, last, spans = [], [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed
            ids += [seq.token_at(p) for p in range(start, start + n)]
            positions += range(start, start + n)
            slots += [seq.block_table[p // L] * L + p % L for p in range(start, start + n)]
            if batch.samples[i]:
                last.append(len(ids) - 1)
            if seq.needs_all_logits and start < len(seq.prompt_ids):
                spans.append((i, len(ids) - n, len(ids)))
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
        sample = self.model.logits(h[torch.tensor(last, dtype=torch.long, device=dev)]).float()  # (B, V)
        chunks = {i: self.model.logits(h[a:b]).float() for i, a, b in spans}  # (S, V) per prefill chunk
        return RunOutput(sample, chunks)
