"""Data and expert parallelism on torch.distributed, applied from outside to the one-device model (as torchtitan).

`torchrun --nproc-per-node W -m openseek train ...` runs train() on every rank. Each builds the same model from the
same seed and trains on its rows of the global batch; gradients of replicated parameters are averaged by a bucketed
all_reduce after backward (train_step's `all_reduce` hook). With `expert_parallel`, rank r keeps routed experts
[r*E/W, (r+1)*E/W) of every MoE layer and (token, expert) pairs travel to their expert's rank and back by
all_to_all. Checkpoints and the export are gathered into the single-device layout: they load anywhere and resume at
any world size.

Shapes: N tokens, K experts per token, D model dim, E routed experts (E_r on this rank), W ranks, M (token, expert)
pairs this rank received.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..model import Transformer
from ..model.moe import Experts, MoE
from .step import StepResult
from .moe_recipe import MoERecipe

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() initialised the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; a world of one without them."""
    if dist.is_available() and dist.is_initialized():  # a caller set it up: use it, leave it alone
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["RANK"] is None or env["WORLD_SIZE"] is None:
        return World()
    try:
        rank, size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"] or env["RANK"])
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {env}") from None
    if not (size >= 1 and 0 <= rank < size):
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={size})")
    if size == 1:
        return World()
    backend = "gloo"
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_size:  # a GPU per rank: the same on all
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors; gloo still carries the CPU ones
    dist.init_process_group(backend, rank=rank, world_size=size)
    return World(rank, size, local_rank, owns_group=True)


def teardown(world: World) -> None:
    if world.owns_group:
        dist.barrier()  # no rank tears down while another still has collectives in flight (gloo aborts)
        dist.destroy_process_group()


def main_first(world: World, fn: Callable[[], T]) -> T:
    """fn() on rank 0, then on the others: rank 0 writes shared files (tokenizer, shards), the rest reuse them."""
    if world.is_main:
        result = fn()
    barrier(world)
    if not world.is_main:
        result = fn()
    return result


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def mean_step_result(res: StepResult, world: World) -> StepResult:
    """The step's LM and balance losses averaged over ranks (equal local batches: the global means); tokens summed."""
    keys = list(res.aux)
    sums = sum_over_ranks([res.loss, *(res.aux[k] for k in keys)], world)
    return StepResult(sums[0] / world.size, {k: v / world.size for k, v in zip(keys, sums[1:])}, res.grad_norm,
                      res.tokens * world.size)


# ---- expert parallelism --------------------------------------------------------------------------------------

class ExpertParallel(Experts):
    """This rank's block of one MoE layer's routed experts; forward sends each (token, expert) pair to the rank
    owning the expert, runs the local experts and returns the outputs the same way (autograd-aware all_to_all)."""

    def __init__(self, experts: Experts, world: World):
        E, F, D = experts.w1.shape
        if E % world.size:
            raise ValueError(f"expert parallelism: world_size={world.size} must divide n_routed_experts={E}")
        super().__init__(E // world.size, D, F)
        self.world_size = world.size
        first = world.rank * (E // world.size)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                getattr(self, name).copy_(getattr(experts, name)[first:first + E // world.size])

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        N, K = ids_NK.shape
        E_r, W = self.w1.shape[0], self.world_size
        order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs by expert, hence by the rank owning it
        expert_of = ids_NK.flatten()[order]  # (N*K,)
        token_of = order // K
        send_W = torch.bincount(expert_of // E_r, minlength=W)  # pairs for each rank
        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W)
        send, recv = send_W.tolist(), recv_W.tolist()
        local_ids_M = expert_of.new_empty(sum(recv))
        dist.all_to_all_single(local_ids_M, expert_of % E_r, recv, send)
        group = dist.group.WORLD
        xs_MD = wait_tensor(all_to_all_single_autograd(x_ND[token_of], recv, send, group))  # (M, D)
        if len(local_ids_M):  # each received pair as a token of its own, weight 1: the gate weights stay at home
            ys_MD = super().forward(xs_MD, xs_MD.new_ones(len(local_ids_M), 1), local_ids_M[:, None])
        else:  # still in the graph: the backward all_to_all needs every rank
            ys_MD = xs_MD * 0
        ys = wait_tensor(all_to_all_single_autograd(ys_MD, send, recv, group))  # (N*K, D), back in `order`
        ys = ys * weights_NK.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, ys.to(x_ND.dtype))


def shard_experts(model: nn.Module, world: World) -> None:
    """Replace every MoE layer's routed experts with this rank's ExpertParallel block (in place)."""
    if world.size == 1:
        return
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallel):
            m.experts = ExpertParallel(m.experts, world)


def _sharded_names(model: nn.Module) -> list[str]:
    return [f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, ExpertParallel)
            for name, _ in m.named_parameters(recurse=False)]


def _gather(t: torch.Tensor, world: World) -> torch.Tensor:
    """The ranks' blocks of t concatenated along dim 0, on rank 0 (other ranks get their block back)."""
    parts = [torch.empty_like(t) for _ in range(world.size)] if world.is_main else None
    dist.gather(t.contiguous(), parts, dst=0)
    return torch.cat(parts) if world.is_main else t


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """model.state_dict() in the single-device layout, complete on rank 0 (a collective: every rank calls it)."""
    sd = model.state_dict()
    for name in _sharded_names(model):
        sd[name] = _gather(sd[name], world)
    return sd


def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], world: World) -> None:
    """Load a single-device state dict, keeping this rank's block of the sharded experts."""
    sd = dict(sd)
    for name in _sharded_names(model):
        sd[name] = sd[name].chunk(world.size)[world.rank]
    model.load_state_dict(sd)


def _sharded_slots(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[int, nn.Parameter]]:
    """(index in the optimizer state dict, parameter) of the sharded parameters."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    return [(i, p) for i, p in enumerate(params) if id(p) in sharded]


def full_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, world: World) -> dict[str, Any]:
    """opt.state_dict() with the sharded parameters' moments gathered, complete on rank 0 (a collective)."""
    sd = opt.state_dict()
    for i, p in _sharded_slots(model, opt):
        if i in sd["state"]:  # every rank steps every expert block (GradSync fills empty gradients), so all agree
            sd["state"][i] = {k: _gather(v, world) if torch.is_tensor(v) and v.shape == p.shape else v
                              for k, v in sd["state"][i].items()}
    return sd


def load_full_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, sd: dict[str, Any], world: World) -> None:
    """Load a full_optimizer_state() (or a one-process optimizer state), keeping this rank's expert blocks."""
    sd = {**sd, "state": dict(sd["state"])}
    for i, p in _sharded_slots(model, opt):
        if i in sd["state"]:
            sd["state"][i] = {k: v.chunk(world.size)[world.rank] if torch.is_tensor(v) and v.dim() == p.dim() else v
                              for k, v in sd["state"][i].items()}
    opt.load_state_dict(sd)


def gathered_model(model: Transformer, world: World) -> Transformer:
    """On rank 0, `model` in the single-device layout (a copy when experts are sharded); other ranks get `model`.
    A collective when experts are sharded: every rank calls it."""
    if not _sharded_names(model):
        return model
    sd = full_state_dict(model, world)
    if not world.is_main:
        return model
    full = Transformer(model.config)
    full.load_state_dict(sd)
    return full


# ---- gradients -----------------------------------------------------------------------------------------------

class GradSync:
    """train_step's hooks: `__call__` averages replicated gradients and sums the recipe's expert loads over ranks;
    `clip_grad_norm` clips by the global norm, expert blocks included."""

    def __init__(self, model: nn.Module, recipe: MoERecipe, world: World, bucket_numel: int = 1 << 24):
        sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}
        self.replicated = [p for p in model.parameters() if id(p) not in sharded]
        self.sharded = [p for p in model.parameters() if id(p) in sharded]
        self.recipe, self.world, self.bucket_numel = recipe, world, bucket_numel

    def __call__(self, model: nn.Module) -> None:
        W = self.world.size
        grads = [p.grad for p in self.replicated if p.grad is not None]  # the same parameters on every rank
        for bucket in _buckets(grads, self.bucket_numel):
            flat = torch.cat([g.flatten() for g in bucket])
            dist.all_reduce(flat)
            flat.div_(W)
            for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(f.view_as(g))
        for p in self.sharded:
            # The all_to_all backward already summed every rank's tokens into this block: dividing by W gives the
            # gradient of the mean of the ranks' losses, the one-process gradient. A block no token reached gets
            # zeros, so AdamW steps it as the one-process run steps its untouched experts.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.div_(W)
        loads = self.recipe.loads()  # V3 bias update: the global loads (new tensors; the stats keep local ones)
        names = sorted(loads)
        if names:
            flat = torch.cat([loads[n].flatten() for n in names])
            dist.all_reduce(flat)
            for n, f in zip(names, flat.split([loads[n].numel() for n in names])):
                loads[n] = f.view_as(loads[n])

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip every gradient by the global norm (as clip_grad_norm_ over the unsharded model); the norm before."""
        def norm(params: list[nn.Parameter]) -> torch.Tensor:
            grads = [p.grad for p in params if p.grad is not None]
            return torch.nn.utils.get_total_norm(grads, foreach=False) if grads else torch.zeros(())

        total_sq = norm(self.replicated).double() ** 2
        if self.sharded:
            sharded_sq = norm(self.sharded).double() ** 2
            dist.all_reduce(sharded_sq)
            total_sq = total_sq + sharded_sq
        total = total_sq.sqrt().float()
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total, foreach=False)
        return total.item()


def _buckets(tensors: list[torch.Tensor], numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each up to `numel` elements (or one larger tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size + t.numel() > numel or (t.dtype, t.device) != (out[-1][0].dtype, out[-1][0].device):
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out
