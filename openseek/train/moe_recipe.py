"""MoE training recipe applied from outside the model: balance losses, token dropping, load statistics, V3 bias.

DeepSeek-V2 §2.2.3-§2.2.4 (expert-, device- and communication-level balance losses, device-level token dropping)
and DeepSeek-V3 §2.1.2 (auxiliary-loss-free bias update, sequence-wise balance loss). Installed as the `route_hook`
and the device limit of every `MoE` layer, so the model and its config stay training-agnostic.

Shapes: B sequences, S tokens per sequence (the papers' T), N = B*S tokens, E routed experts (N_r), K experts per
token (K_r), G device groups (the papers' D; experts of device d are the contiguous block d*E/G ... (d+1)*E/G - 1,
the router's groups).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import MoE
from ..validation import check, is_int, is_number

log = logging.getLogger(__name__)
LOSS_NAMES = ("expert_balance", "device_balance", "comm_balance", "seq_balance")


def max_violation(load_XE: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MaxVio of expert loads (..., E): max_i load_i / mean_i load_i - 1 (0: perfectly balanced)."""
    load_XE = load_XE.double()
    mean_X = load_XE.mean(-1)
    return torch.where(mean_X > 0, load_XE.amax(-1) / mean_X.clamp(min=1e-12) - 1, torch.zeros_like(mean_X))


@dataclass(slots=True)
class _LayerRecord:
    """What one MoE layer saw since reset(): its losses (latest forward), loads and dropped pairs."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    load_E: torch.Tensor | None = None  # (token, expert) pairs selected per expert, before dropping
    load_BE: torch.Tensor | None = None  # the same per sequence, the sequences of every forward stacked
    dropped: torch.Tensor | None = None
    pairs: int = 0


@dataclass
class MoERecipe:
    """Balance losses (alpha1/2/3, seq_aux_alpha), device-level dropping, V3 bias update (bias_update_speed)."""
    alpha1: float = 0.0
    alpha2: float = 0.0
    alpha3: float = 0.0
    n_devices: int = 1
    device_limit: int = 1  # the papers' M: install() limits each router to this many devices
    capacity_factor: float | None = None  # None: never drop
    drop_exempt_fraction: float = 0.1
    seq_aux_alpha: float = 0.0
    bias_update_speed: float = 0.0
    # training sequences seen so far over the run and all ranks: the run-wide numbering of the exempt sequences
    sequences: int = field(default=0, init=False)
    _first: int = field(default=0, init=False, repr=False)  # the run-wide index of this forward's first sequence
    _names: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    _records: dict[str, _LayerRecord] = field(default_factory=dict, init=False, repr=False)
    _bias_load: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("alpha1", "alpha2", "alpha3", "seq_aux_alpha", "bias_update_speed"):
            v = getattr(self, name)
            check(is_number(v) and v >= 0, name, v, "must be a finite number >= 0")
        check(is_int(self.n_devices) and self.n_devices >= 1, "n_devices", self.n_devices, "must be an integer >= 1")
        check(is_int(self.device_limit) and 1 <= self.device_limit <= self.n_devices, "device_limit",
              self.device_limit, f"must be an integer in [1, n_devices={self.n_devices}]")
        cf = self.capacity_factor
        check(cf is None or (is_number(cf) and cf > 0), "capacity_factor", cf, "must be > 0, or None to never drop")
        check(is_number(self.drop_exempt_fraction) and 0.0 <= self.drop_exempt_fraction <= 1.0,
              "drop_exempt_fraction", self.drop_exempt_fraction, "must lie in [0, 1]")

    # ---- wiring ------------------------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Set this recipe as the route_hook of every MoE layer of `model` and limit its routers to device_limit
        of the n_devices expert blocks."""
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        for name, moe in layers:
            E, K = moe.gate.weight.shape[0], moe.gate.top_k
            check(E % self.n_devices == 0, "n_devices", self.n_devices,
                  f"must divide n_routed_experts={E} (layer {name})")
            check(self.device_limit * (E // self.n_devices) >= K, "device_limit", self.device_limit,
                  f"the kept devices must hold >= num_experts_per_tok={K} experts (layer {name})")
            check(self.bias_update_speed == 0 or moe.gate.bias is not None, "bias_update_speed",
                  self.bias_update_speed, f"needs routers with a selection bias (topk_method 'noaux_tc'); "
                  f"layer {name} has none")
        if layers:
            self._warn_if_unbound(max(moe.gate.top_k for _, moe in layers))
        for name, moe in layers:
            moe.route_hook = self._hook
            moe.gate.limit_devices(self.n_devices, self.device_limit)
            self._names[id(moe)] = name

    def _warn_if_unbound(self, top_k: int) -> None:
        """Say so when device-limited routing was asked for (n_devices > 1) but can change no token's experts."""
        G, M = self.n_devices, self.device_limit
        if G == 1:
            return
        if M == G:
            log.warning("device_limit=%d = n_devices=%d keeps every device group: routing is not limited; choose "
                        "device_limit < n_devices", M, G)
        elif M >= top_k:
            log.warning("device_limit=%d >= num_experts_per_tok=%d: a token's %d experts span at most %d device "
                        "groups, so the limit never binds; choose device_limit < %d", M, top_k, top_k, top_k, top_k)

    def remove(self, model: nn.Module) -> None:
        """Unset the route_hook and device limit this recipe installed on `model`'s MoE layers."""
        for m in model.modules():
            if isinstance(m, MoE) and id(m) in self._names:
                m.route_hook = None
                m.gate.limit_devices(1, 1)
                name = self._names.pop(id(m))
                self._records.pop(name, None)
                self._bias_load.pop(name, None)

    def reset(self, first_sequence: int = 0) -> None:
        """Forget losses, loads and drops (call before each forward). Bias-update loads persist until update_bias.
        first_sequence: the run-wide index of the forward's first sequence, which numbers the exempt ones."""
        self._records.clear()
        self._first = first_sequence

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint keeps for an exact resume: the count of training sequences."""
        return {"sequences": self.sequences}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sequences = state["sequences"]

    # ---- results -----------------------------------------------------------------------------------------------

    def step_losses(self) -> dict[str, torch.Tensor]:
        """Each enabled balance loss, summed over layers, for each layer's latest forward (graph kept)."""
        out: dict[str, torch.Tensor] = {}
        for rec in self._records.values():
            for k, v in rec.losses.items():
                out[k] = out[k] + v if k in out else v
        return out

    def total_aux(self) -> torch.Tensor:
        """The sum of step_losses() (a zero scalar when no loss is enabled)."""
        losses = list(self.step_losses().values())
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def stats(self) -> dict[str, dict[str, float]]:
        """Per layer, over the forwards since reset(): load max/mean, CV of per-expert counts, dead experts, drops,
        and V3's MaxVio of the whole batch and of each sequence (averaged over the sequences)."""
        out = {}
        for name, rec in self._records.items():
            load_E = rec.load_E.double()
            mean = load_E.mean()
            out[name] = {
                "load_max_over_mean": (load_E.max() / mean).item() if mean > 0 else 0.0,
                "maxvio_batch": max_violation(load_E).item(),
                "maxvio_seq": max_violation(rec.load_BE).mean().item(),
                "load_cv": (load_E.std(correction=0) / mean).item() if mean > 0 else 0.0,  # population std
                "dead_experts": float((load_E == 0).sum().item()),
                "dropped_fraction": rec.dropped.item() / rec.pairs if rec.pairs else 0.0,
            }
        return out

    def loads(self) -> dict[str, torch.Tensor]:
        """Per-layer expert loads of the training forwards pending for update_bias (all-reduce these in place across
        data-parallel ranks)."""
        return self._bias_load

    @torch.no_grad()
    def update_bias(self, model: nn.Module) -> None:
        """V3 aux-loss-free rule after the optimizer step: b_i -= gamma * sign(load_i - mean load); clears the loads."""
        if self.bias_update_speed == 0:
            self._bias_load.clear()
            return
        for m in model.modules():
            name = self._names.get(id(m)) if isinstance(m, MoE) else None
            load_E = self._bias_load.pop(name, None) if name is not None else None
            if load_E is None or m.gate.bias is None:
                continue
            load_E = load_E.float()
            m.gate.bias.sub_(self.bias_update_speed * torch.sign(load_E - load_E.mean()).to(m.gate.bias.dtype))

    # ---- the hook ----------------------------------------------------------------------------------------------

    def _hook(self, moe: MoE, x: torch.Tensor, scores_NE: torch.Tensor, weights_NK: torch.Tensor,
              ids_NK: torch.Tensor) -> torch.Tensor:
        name = self._names[id(moe)]
        N, E = scores_NE.shape
        B = x.shape[0] if x.dim() == 3 else 1
        S = N // B
        rec = self._records.setdefault(name, _LayerRecord())
        rec.losses = self._losses(scores_NE.view(B, S, E), ids_NK.view(B, S, -1))
        load_E = torch.bincount(ids_NK.flatten(), minlength=E).detach()
        rec.load_E = load_E if rec.load_E is None else rec.load_E + load_E
        ids_BJ = ids_NK.detach().reshape(B, -1)  # (B, S*K): the experts each sequence's tokens chose
        load_BE = torch.zeros(B, E, dtype=load_E.dtype, device=ids_BJ.device).scatter_add_(1, ids_BJ,
                                                                                             torch.ones_like(ids_BJ))
        rec.load_BE = load_BE if rec.load_BE is None else torch.cat([rec.load_BE, load_BE])
        if self.bias_update_speed > 0 and moe.training:  # only training tokens move the bias, not validation's
            prev = self._bias_load.get(name)
            self._bias_load[name] = load_E if prev is None else prev + load_E
        drop_NK = torch.zeros_like(ids_NK, dtype=torch.bool)
        if moe.training and self.capacity_factor is not None:
            drop_NK = self._drop_mask(scores_NE.detach().gather(1, ids_NK), ids_NK, E, B)
            weights_NK = weights_NK.masked_fill(drop_NK, 0.0)
        dropped = drop_NK.sum()
        rec.dropped = dropped if rec.dropped is None else rec.dropped + dropped
        rec.pairs += ids_NK.numel()
        return weights_NK

    def _losses(self, scores_BSE: torch.Tensor, ids_BSK: torch.Tensor) -> dict[str, torch.Tensor]:
        """The papers' losses, with T = one sequence (V2 §2.2.3, V3 eq. 17-20), averaged over the B sequences."""
        B, S, E = scores_BSE.shape
        K, G = ids_BSK.shape[-1], self.n_devices
        # f_i: selection frequency (indicators, no gradient); P_i: mean affinity (gradient into the router)
        chosen_BSE = F.one_hot(ids_BSK, E).sum(2).float()  # (B, S, E), 1 where token t selects expert i
        f_BE = chosen_BSE.sum(1) * E / (K * S)  # (B, E)
        P_BE = scores_BSE.mean(1)  # (B, E)
        out = {}
        if self.alpha1 > 0:
            out["expert_balance"] = self.alpha1 * (f_BE * P_BE).sum(-1).mean()
        if self.alpha2 > 0 or self.alpha3 > 0:
            P_BG = P_BE.view(B, G, E // G).sum(-1)  # P'_d = P''_d: summed over the device's experts
            if self.alpha2 > 0:
                f_BG = f_BE.view(B, G, E // G).mean(-1)  # f'_d: mean over the device's experts
                out["device_balance"] = self.alpha2 * (f_BG * P_BG).sum(-1).mean()
            if self.alpha3 > 0:
                sent_BSG = chosen_BSE.view(B, S, G, E // G).amax(-1)  # (B, S, G), 1 if token t reaches device d
                f_BG = sent_BSG.sum(1) * G / (self.device_limit * S)  # f''_d, the papers' M = device_limit
                out["comm_balance"] = self.alpha3 * (f_BG * P_BG).sum(-1).mean()
        if self.seq_aux_alpha > 0:
            s_BSE = scores_BSE / scores_BSE.sum(-1, keepdim=True)  # s': normalised over all experts
            out["seq_balance"] = self.seq_aux_alpha * (f_BE * s_BSE.mean(1)).sum(-1).mean()
        return out

    def _exempt(self, B: int, device: torch.device) -> torch.Tensor:
        """(B,) True for the sequences never dropped: run-wide sequence g when floor((g+1) f) > floor(g f), so any
        n consecutive sequences of a run hold floor(n f) or ceil(n f), whatever the micro-batch size (a count
        floored per micro-batch exempted none below 1/f sequences)."""
        p, q = Fraction(self.drop_exempt_fraction).limit_denominator(1 << 20).as_integer_ratio()  # exact integers
        g = torch.arange(self._first, self._first + B, device=device, dtype=torch.int64)
        return (g + 1) * p // q > g * p // q

    def _drop_mask(self, aff_NK: torch.Tensor, ids_NK: torch.Tensor, E: int, B: int) -> torch.Tensor:
        """(N, K) True for the pairs dropped: on each over-budget device its lowest-affinity non-exempt pairs."""
        N, K = ids_NK.shape
        G = self.n_devices
        budget = math.floor(self.capacity_factor * N * K / G + 1e-6)  # pairs per device; the average times the factor
        dev = (ids_NK // (E // G)).flatten()  # (N*K,) device of each pair
        exempt = self._exempt(B, ids_NK.device).repeat_interleave(N // B)[:, None].expand(N, K).flatten()
        count_G = torch.bincount(dev, minlength=G)
        cand_G = torch.bincount(dev[~exempt], minlength=G)
        n_drop_G = (count_G - budget).clamp(min=0).minimum(cand_G)
        # sort pairs by (device, affinity) with exempt pairs last in their device; drop the first n_drop of each
        aff = aff_NK.flatten().masked_fill(exempt, float("inf"))
        by_aff = aff.argsort(stable=True)
        order = by_aff[dev[by_aff].argsort(stable=True)]
        start_G = count_G.cumsum(0) - count_G
        rank = torch.arange(N * K, device=dev.device) - start_G[dev[order]]
        drop = torch.zeros(N * K, dtype=torch.bool, device=dev.device)
        drop[order] = rank < n_drop_G[dev[order]]
        return drop.view(N, K)
