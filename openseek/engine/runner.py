"""The one engine file that touches tensors: the latent cache, batch tensors, the forward pass.

Shapes: N packed new tokens, B sequences, S new tokens of one sequence, D model dim, V vocabulary, C latent,
R rope dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..model import Transformer
from ..model.batch import ForwardBatch
from ..model.ops import COMPILED
from .scheduler import ScheduledBatch

# inductor's settings for the decode graph (what they bought, with this file's other changes of 2026-11-30, is in
# bench/results/measured.md; the per-change decode_ab ratios there are upper bounds on a shared machine):
# - realize_reads_threshold 0: a pointwise result read by two consumers is stored, not inlined into both. Inlined,
#   an RMSNorm's arithmetic ran inside the q / kv_a projections' multiply-and-sum loops, once per weight row.
# - floating-point contraction: the loops' multiply and add as one FMA.
DECODE_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "realize_reads_threshold": 0,
                           "cpp.enable_floating_point_contract_flag": "fast"}

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """A step's batch as plain lists: what a tensor-parallel rank 0 sends its workers."""

    ids: list[int]  # (N,) the new tokens, packed
    positions: list[int]  # (N,)
    slots: list[int]  # (N,) cache rows they are written to
    tables: list[list[int]]  # (B, P) block tables, padded with 0
    context_lens: list[int]  # (B,)
    query_lens: list[int]  # (B,)
    num_decodes: int


@dataclass(slots=True)
class RunOutput:
    sample_logits: torch.Tensor  # (B, V) float32, one row per sequence that samples, in batch order
    chunk_logits: dict[int, torch.Tensor]  # batch index -> (S, V) float32 for every token of its prefill chunk


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, compile: bool = False):
        cfg = model.config
        self.model, self.block_size = model, block_size
        model.absorb_weights()  # the absorbed path's W_UK / W_UV^T, built once from the loaded weights
        # The latent cache and nothing else: per layer and token, c_kv (C) and the rotated k_pe (R). One tensor per
        # layer, not a view of one: the compiled graph writes a graph input in place, but a view of one would have
        # every layer's whole cache copied out and back by functionalization, every step.
        self.kv_cache = [torch.zeros(num_blocks * block_size, cfg.kv_cache_dim, dtype=model.dtype, device=model.device)
                         for _ in range(cfg.num_hidden_layers)]
        # decode steps, logits included, as one graph: per-op dispatch, not bandwidth, bounds a small model's decode
        # step, and COMPILED's single-row kernels read the weights faster than the library GEMMs; dynamic,
        # so that batch size and context length compile once, not once per value; the C++ wrapper calls the
        # graph's kernels without a Python line per op
        self._decode = torch.compile(self._decode_logits, dynamic=True, options=DECODE_INDUCTOR_OPTIONS) \
            if compile else None

    @property
    def healthy(self) -> bool:
        """Whether the runner can still run steps (a parallel one loses this with a worker)."""
        return True

    @property
    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.kv_cache)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunOutput:
        """Run the scheduled tokens: logits of the sequences that sample, and of whole chunks where asked."""
        step, last, spans = self.prepare(batch)
        if self._decode is not None and step.num_decodes == len(step.query_lens):  # no chunk asks for all logits
            logits = self._compiled(step)  # (N, V)
            if logits is not None:
                return RunOutput(logits[torch.tensor(last, dtype=torch.long, device=logits.device)].float(), {})
        return self.logits(self.hidden_states(step), last, spans)

    def logits(self, h: torch.Tensor, last: list[int], spans: list[tuple[int, int, int]]) -> RunOutput:
        """Logits of the rows of h (N, D) that sample, and of the spans of logged prefill chunks."""
        dev = self.kv_cache[0].device
        sample = self.model.logits(h[torch.tensor(last, dtype=torch.long, device=dev)]).float()  # (B, V)
        chunks = {i: self.model.logits(h[a:b]).float() for i, a, b in spans}  # (S, V) per prefill chunk
        return RunOutput(sample, chunks)

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[int], list[tuple[int, int, int]]]:
        """The step's inputs; the rows of h that sample; (batch index, first row, end row) of logged chunks."""
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
        step = StepInputs(ids, positions, slots, tables, [seq.num_computed + n for seq, n in zip(batch.seqs,
                          batch.num_new)], list(batch.num_new), batch.num_decodes)
        return step, last, spans

    @torch.inference_mode()
    def hidden_states(self, step: StepInputs) -> torch.Tensor:
        """The forward over the step's tokens, extending the cache: final hidden states (N, D)."""
        ids = torch.tensor(step.ids, dtype=torch.long, device=self.kv_cache[0].device)
        return self.model.hidden_states_paged(ids, self.forward_batch(step), self.kv_cache)  # a rerun rewrites rows

    def forward_batch(self, step: StepInputs) -> ForwardBatch:
        dev = self.kv_cache[0].device
        return ForwardBatch(
            positions=torch.tensor(step.positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(step.slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(step.tables, dtype=torch.long, device=dev),
            context_lens=step.context_lens,
            query_lens=step.query_lens,
            num_decodes=step.num_decodes,
            block_size=self.block_size,
        )

    def _decode_logits(self, ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """What the compiled graph runs: the logits (N, V) of every new token."""
        return self.model.logits(self.model.hidden_states_paged(ids, fb, self.kv_cache, COMPILED), COMPILED)

    def _compiled(self, step: StepInputs) -> torch.Tensor | None:
        """The compiled decode's logits; None, and eager from then on, where it fails (no C++ compiler, an op
        inductor cannot lower): eager is always right."""
        try:
            # float attributes (eps, softmax_scale) as constants, not graph inputs each guarded by a Python lambda
            # checked every step (54 lambda guards -> 16 on the bundled model)
            with torch._dynamo.config.patch(specialize_float=True):
                return self._decode(torch.tensor(step.ids, dtype=torch.long, device=self.kv_cache[0].device),
                                    self.forward_batch(step))
        except Exception as e:
            logger.warning("compiled decode failed (%s: %s); decoding eagerly from now on", type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")
            self._decode = None
            return None
