"""Tensor and expert parallelism for serving, applied to a built Transformer from outside (as torchtitan does).

`shard(model, layout, reduce)` turns a one-device model, on the meta device (before loading) or loaded, into
rank `layout.rank`'s part of W = `layout.size` ranks, in place: parameter and module names stay the one-device
ones. T = W ways for attention, or W / data_parallel with data-parallel groups.

- MLA: heads split (Megatron-style): wq / wq_b and wkv_b keep the rows of this rank's H/T heads (column
  parallel), wo the matching input columns (row parallel); the partial outputs are summed by `reduce` after wo.
  wq_a, wkv_a and the norms are replicated, so every rank computes and caches the whole latent (c_kv, k_pe) of
  every token: the latent cache is replicated, not split (MLA's one latent serves all heads).
- Dense FFNs and shared experts: w1 / w3 rows split, w2 columns split; one `reduce` after the layer.
- Routed experts, `expert_parallel`: rank r holds experts [r*E/W, (r+1)*E/W) whole, runs them for every token
  that chose them (all tokens are on every rank) and the MoE layer's output, shared experts included, is summed
  by one `reduce`: the simplest correct scheme, one all-reduce of (N, D) per layer instead of two all_to_alls.
  Without it, every expert's hidden dim F is split (w1 / w3 rows, w2 columns), as vLLM does without EP.
- Router, embedding, lm_head and norms are replicated.
- With `data_parallel` > 1 (data-parallel attention) the ranks form that many groups of T: attention is split T
  ways within a group and each group attends over its own sequences (hidden_states_dp), the FFNs split W ways.

Shapes: N tokens, K experts per token, M (token, expert) pairs on this rank, D model dim, E routed experts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..validation import check
from .batch import ForwardBatch
from .layers import SwiGLU
from .mla import MLA
from .moe import Experts, MoE
from .ops import INFERENCE, TRAINING, Kernels

Reduce = Callable[[torch.Tensor], None]  # sums a tensor over the ranks, in place

# native parameter (after `layers.{i}.`) -> the dim this rank keeps a contiguous 1/W of
COLUMN_PARALLEL = ("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_b.weight", "ffn.w1.weight", "ffn.w3.weight",
                   "ffn.shared.w1.weight", "ffn.shared.w3.weight")  # output rows (H or F outer)
ROW_PARALLEL = ("attn.wo.weight", "ffn.w2.weight", "ffn.shared.w2.weight")  # input columns
EXPERT_HIDDEN = {"ffn.experts.w1": 1, "ffn.experts.w3": 1, "ffn.experts.w2": 2}  # stacked (E, F, D) / (E, D, F)
EXPERTS = tuple(EXPERT_HIDDEN)


@dataclass(frozen=True, slots=True)
class Layout:
    """Rank `rank` of `size` ranks; `expert_parallel`: routed experts split whole, else each expert's F split.
    With `data_parallel` > 1 the ranks form that many groups of T = size / data_parallel: attention is split T
    ways within a group (each group attends over its own sequences), the FFNs `size` ways."""

    rank: int
    size: int
    expert_parallel: bool = False
    data_parallel: int = 1

    @property
    def tp(self) -> int:
        """Ranks an attention layer is split over."""
        return self.size // self.data_parallel

    @property
    def group(self) -> int:
        """This rank's data-parallel group."""
        return self.rank // self.tp

    def check(self, cfg: ModelConfig, owner: str = "config field ") -> None:
        """FieldError naming tensor_parallel_size (or data_parallel_size) when the model does not split so."""
        T, D, W = self.tp, self.data_parallel, self.size
        check(cfg.num_attention_heads % T == 0, "tensor_parallel_size", T, f"must divide num_attention_heads="
              f"{cfg.num_attention_heads} (attention is split by heads)", owner)
        # the FFNs split over all W ranks: a failure names the factor the user chose last
        field, value, ways = ("tensor_parallel_size", T, "") if D == 1 else \
            ("data_parallel_size", D, f" (x tensor_parallel_size={T}: {W} ranks)")
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        check(not dense or cfg.intermediate_size % W == 0, field, value,
              f"must divide intermediate_size={cfg.intermediate_size}{ways} (dense FFNs are split)", owner)
        if not cfg.n_routed_experts:
            return
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        check(shared % W == 0, field, value, f"must divide the shared experts' hidden size {shared}{ways}", owner)
        if self.expert_parallel:
            check(cfg.n_routed_experts % W == 0, field, value, f"must divide n_routed_experts={cfg.n_routed_experts}"
                  f"{ways} under enable_expert_parallel (each rank holds E/W whole experts)", owner)
        else:
            check(cfg.moe_intermediate_size % W == 0, field, value, f"must divide moe_intermediate_size="
                  f"{cfg.moe_intermediate_size}{ways} (each expert's hidden dim is split; or enable_expert_parallel)",
                  owner)

    def part(self, n: int, native: str = "") -> tuple[int, int]:
        """This rank's [start, stop) of n items split in equal contiguous parts: T ways for attention's
        parameters (within the data-parallel group), W ways for the rest."""
        index, ways = (self.rank % self.tp, self.tp) if ".attn." in f".{native}" else (self.rank, self.size)
        step = n // ways
        return index * step, (index + 1) * step

    def split_dim(self, native: str) -> int | None:
        """The dim of a native parameter this rank keeps a part of; None where it is replicated."""
        m = re.fullmatch(r"layers\.\d+\.(.+)", native)
        rest = m.group(1) if m else ""
        if rest in COLUMN_PARALLEL:
            return 0
        if rest in ROW_PARALLEL:
            return 1
        if rest in EXPERTS:
            return 0 if self.expert_parallel else EXPERT_HIDDEN[rest]
        return None

    def hub_part(self, native: str, expert: int | None, full_shape: tuple[int, ...]
                 ) -> tuple[int, int, int] | None:
        """(dim, start, stop) of a checkpoint tensor that this rank reads, for native parameter `native` (expert
        `expert` of a stacked one); None: the whole tensor. Whole experts (expert parallel) are chosen by
        local_expert, not here."""
        dim = self.split_dim(native)
        if dim is None or (expert is not None and self.expert_parallel):
            return None
        dim = dim - 1 if expert is not None else dim  # a hub expert tensor is one matrix of the stack
        return (dim, *self.part(full_shape[dim], native))

    def local_expert(self, native: str, expert: int | None, n_experts: int) -> int | None:
        """Index into this rank's stack of checkpoint expert `expert` (-1: another rank's); `expert` if not split."""
        if expert is None or not self.expert_parallel or self.split_dim(native) is None:
            return expert
        start, stop = self.part(n_experts)
        return expert - start if start <= expert < stop else -1


class LocalExperts(Experts):
    """Routed experts [first, first + E) of the model's: each (token, expert) pair whose expert is here runs as a
    row of its own (K = 1); pairs of other ranks' experts are skipped; -> the partial sum over this rank's."""

    def __init__(self, experts: Experts, first: int):
        nn.Module.__init__(self)
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.first = first

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor,
                kernels: Kernels = TRAINING) -> torch.Tensor:
        local_NK = (ids_NK >= self.first) & (ids_NK < self.first + self.w1.shape[0])
        n_M, k_M = local_NK.nonzero(as_tuple=True)  # (M,) each
        y_ND = torch.zeros_like(x_ND)
        if len(n_M) == 0:
            return y_ND
        ids_M1 = (ids_NK[n_M, k_M] - self.first)[:, None]  # (M, 1)
        y_MD = kernels.routed_experts(self.w1, self.w2, self.w3, x_ND[n_M], weights_NK[n_M, k_M, None], ids_M1)
        return y_ND.index_add_(0, n_M, y_MD)


def shard(model: nn.Module, layout: Layout, reduce: Reduce) -> None:
    """Keep rank layout.rank's part of every split parameter and sum the partial outputs with `reduce` (see the
    module docstring); works on the meta device, so a loader can then read only this rank's slices."""
    if layout.size == 1:
        return
    layout.check(model.config)
    for name, p in list(model.named_parameters()):
        dim = layout.split_dim(name)
        if dim is None:
            continue
        owner_name, _, attr = name.rpartition(".")
        start, stop = layout.part(p.shape[dim], name)
        kept = p.detach().narrow(dim, start, stop - start)
        model.get_submodule(owner_name)._parameters[attr] = nn.Parameter(
            kept if kept.is_meta else kept.clone(), requires_grad=False)
    for layer in model.layers:
        attn: MLA = layer.attn
        attn.n_heads //= layout.tp
        if attn.w_uk is not None:
            attn.absorb_weights()
        if layout.data_parallel == 1:  # else hidden_states_dp reduces, joining the groups' rows too
            attn.wo.register_forward_hook(_reducing(reduce))
        ffn = layer.ffn
        if isinstance(ffn, MoE) and layout.expert_parallel:
            ffn.experts = LocalExperts(ffn.experts, layout.part(model.config.n_routed_experts)[0])
        assert isinstance(ffn, (MoE, SwiGLU)), f"unknown FFN {type(ffn).__name__}"
        ffn.register_forward_hook(_reducing(reduce))  # an MoE's routed and shared partial sums in one reduce


def _reducing(reduce: Reduce) -> Callable:
    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        assert out.is_contiguous(), "a reduced output must be contiguous: the all-reduce works in place"
        reduce(out)
    return hook


def hidden_states_dp(model: nn.Module, input_ids: torch.Tensor, batch: ForwardBatch | None, rows: tuple[int, int],
                     kv_cache: Sequence[torch.Tensor], reduce: Reduce, kernels: Kernels = INFERENCE) -> torch.Tensor:
    """Transformer.hidden_states_paged under data-parallel attention: every rank holds all N tokens' hidden
    states, attends (its heads) over only its group's rows [lo, hi) with its group's `batch` and cache, and one
    all-reduce sums the heads' partial outputs and joins the groups' rows; the FFNs run on all N tokens. -> (N, D)
    (Block.forward written out, for the slicing around attention.)"""
    lo, hi = rows
    x = model.embed(input_ids)[None]  # (1, N, D)
    freqs_cis = model.rotary(batch.positions[None]) if batch is not None else None  # (1, hi - lo, R/2) complex
    for layer, cache in zip(model.layers, kv_cache):
        a = torch.zeros_like(x)  # (1, N, D)
        if batch is not None:
            a[:, lo:hi] = layer.attn(layer.attn_norm(x[:, lo:hi], kernels), freqs_cis, batch, cache, kernels)
        reduce(a)
        x = x + a
        x = x + layer.ffn(layer.ffn_norm(x, kernels), kernels)  # its hook all-reduces over every rank
    return model.norm(x[0], kernels)
