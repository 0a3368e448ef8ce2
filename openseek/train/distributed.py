"""Data and expert parallelism on torch.distributed's building blocks, applied from outside the one-device model
(as torchtitan).

`torchrun --nproc-per-node W -m openseek train ...` runs train() on every rank; one device mesh spans the W ranks.
Each builds the same model from the same seed and trains on its rows of the global batch; DDP (`replicate`)
averages the replicated parameters' gradients during backward. With `expert_parallel` a ParallelStyle
(ExpertParallel) shards every MoE layer's routed experts in place as DTensors over the mesh (rank r holds experts
[r*E/W, (r+1)*E/W)) and (token, expert) pairs travel to their expert's rank and back by all_to_all. Checkpoints are full state dicts (torch.distributed.checkpoint):
the single-device layout, which loads anywhere and resumes at any world size.

Shapes: N tokens, K experts per token, D model dim, F expert hidden dim, E routed experts (on this rank), W ranks,
M (token, expert) pairs this rank received.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from ..model import Transformer
from ..model.moe import MoE
from ..model.ops import TRAINING
from ..validation import check
from .moe_recipe import MoERecipe
from .step import LMLoss, StepResult

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class World:
    mesh: DeviceMesh | None = None  # None: one process, which runs no distributed code
    owns_group: bool = False  # setup() initialised the process group, so teardown() destroys it

    @property
    def rank(self) -> int:
        return self.mesh.get_rank() if self.mesh is not None else 0

    @property
    def size(self) -> int:
        return self.mesh.size() if self.mesh is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str = "cpu") -> World:
    """A device mesh over the ranks torchrun started (or over a process group a caller set up); a world of one
    without them."""
    owns = not (dist.is_available() and dist.is_initialized())
    if owns and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if owns:
        dist.init_process_group()  # env://; gloo for CPU tensors, and NCCL for CUDA ones where CUDA is built
    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return World(mesh, owns)


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

class ExpertParallel(ParallelStyle):
    """An Experts' stacked weights sharded Shard(0) over a 1-D mesh; each (token, expert) pair travels to its expert's
    rank and its output back by autograd-aware all_to_all (torchtitan's ExpertParallel). parallelize_module applies it
    in place, so the module tree and the state-dict names stay the one-device ones."""

    _pending: tuple | None = None  # what the combine needs from this forward's dispatch

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._dispatch, self._combine)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, p in module.named_parameters(recurse=False):
            E, W = p.shape[0], mesh.size()
            check(E % W == 0, "world_size", W, f"must divide n_routed_experts={E}", owner="expert parallelism: ")
            shards = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(shards))

    def _dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        """-> the Experts' inputs on this rank: each received pair as a token of its own with gate weight 1 (the
        gate weights stay at home), and kernels that compute on the local shards (to_local() keeps the gradients' way
        back to the DTensors)."""
        x_ND, weights_NK, ids_NK, *rest = inputs
        K = ids_NK.shape[1]
        E, W, group = module.w1.shape[0] // mesh.size(), mesh.size(), mesh.get_group()
        order = ids_NK.flatten().argsort(stable=True)  # (N*K,) pairs by expert, hence by the rank owning it
        expert_of = ids_NK.flatten()[order]  # (N*K,)
        token_of = order // K
        send_W = torch.bincount(expert_of // E, minlength=W)  # pairs for each rank
        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W, group=group)
        send, recv = send_W.tolist(), recv_W.tolist()
        local_ids_M = expert_of.new_empty(sum(recv))
        dist.all_to_all_single(local_ids_M, expert_of % E, recv, send, group=group)
        xs_MD = wait_tensor(all_to_all_single_autograd(x_ND[token_of], recv, send, group))  # (M, D)
        self._pending = (x_ND, weights_NK.flatten()[order], token_of, send, recv, group)
        kernels = rest[0] if rest else TRAINING
        fn = kernels.routed_experts
        on_shards = replace(kernels,
                            routed_experts=lambda w1, w2, w3, *a: fn(w1.to_local(), w2.to_local(), w3.to_local(), *a))
        return xs_MD, xs_MD.new_ones(len(local_ids_M), 1), local_ids_M[:, None], on_shards

    def _combine(self, module: nn.Module, ys_MD: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        """-> (N, D): each pair's output back at its token, times its gate weight."""
        x_ND, gate, token_of, send, recv, group = self._pending
        self._pending = None
        ys = wait_tensor(all_to_all_single_autograd(ys_MD, send, recv, group))  # (N*K, D), back in `order`
        ys = ys * gate[:, None].to(ys.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, ys.to(x_ND.dtype))


def shard_experts(model: nn.Module, world: World) -> None:
    """Shard every MoE layer's routed experts over the world in place (ExpertParallel)."""
    if world.size == 1:
        return
    for m in model.modules():
        if isinstance(m, MoE):
            parallelize_module(m.experts, world.mesh, ExpertParallel())


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ExpertParallel sharded (DTensors); empty when none are."""
    return [p for p in model.parameters() if isinstance(p, DTensor)]


def sum_loads(loads: dict[str, torch.Tensor]) -> None:
    """V3's bias update on the global expert loads: each rank's loads summed over the ranks, in one all_reduce,
    stored back into the dict (new tensors; the recipe's stats keep the local ones)."""
    names = sorted(loads)
    if names:
        flat = torch.cat([loads[n].flatten() for n in names])
        dist.all_reduce(flat)
        for n, f in zip(names, flat.split([loads[n].numel() for n in names])):
            loads[n] = f.view_as(loads[n])


def average_expert_grads(model: nn.Module, world: World) -> None:
    """The sharded experts' gradients over the ranks' mean loss, as DDP gives the replicated ones.

    The all_to_all backward already summed every rank's tokens into each block: dividing by W gives the gradient of
    the mean of the ranks' losses, the one-process gradient. A block no token reached gets zeros, so AdamW steps it
    as the one-process run steps its untouched experts (and every rank holds optimizer state for every block)."""
    for p in sharded_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.div_(world.size)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ over DTensor and plain gradients, which it refuses to mix in one norm (torch 2.13: "got mixed
    torch.Tensor and DTensor"): the two norms combined, then every gradient clipped; -> the norm before."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    total_sq = torch.zeros((), dtype=torch.float64)
    if plain:
        total_sq = total_sq + torch.nn.utils.get_total_norm(plain, foreach=False).double() ** 2
    if sharded:
        total_sq = total_sq + torch.nn.utils.get_total_norm(sharded, foreach=False).full_tensor().double() ** 2
    total = total_sq.sqrt().float()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total, foreach=False)
    return total.item()


class DataParallel:
    """train_step's multi-rank pieces (step.Parallel): DDP averages the replicated gradients during the last
    micro-batch's backward; the sharded experts, the global norm and the bias update's loads are done by hand,
    where DDP does not reach."""

    def __init__(self, model: Transformer, recipe: MoERecipe, world: World, dtype: torch.dtype):
        from torch.distributed._composable.replicate import replicate

        experts = [m.experts for m in model.modules() if isinstance(m, MoE) and sharded_parameters(m.experts)]
        # DDP's own process group: its bucket all-reduces may then interleave with the experts' all_to_all
        self.group = dist.new_group()
        self.loss_module = replicate(LMLoss(model, dtype), ignored_modules=experts, process_group=self.group,
                                     find_unused_parameters=True, broadcast_buffers=False)
        self.model, self.recipe, self.world = model, recipe, world

    def loss(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        self.loss_module.set_requires_gradient_sync(sync)  # False: accumulate locally, reduce after the last
        return self.loss_module(x, y)

    def finish_grads(self) -> None:
        average_expert_grads(self.model, self.world)
        sum_loads(self.recipe.loads())

    def clip_grad_norm(self, max_norm: float) -> float:
        return clip_grad_norm(self.model, max_norm)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def close(self) -> None:
        """Release DDP's process group (a caller may run several trainings in one world)."""
        dist.destroy_process_group(self.group)


# ---- full state dicts ----------------------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only


def full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts in the single-device layout, complete on rank 0 (a collective)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, opt, options=_FULL)


def load_full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, Any],
                          opt_sd: dict[str, Any]) -> None:
    """Load full_state_dicts() (from any world size), each rank keeping its shards."""
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    # strict=False: a parameter no token has reached yet has no optimizer state
    set_optimizer_state_dict(model, opt, opt_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def gathered_model(model: Transformer) -> Transformer:
    """On rank 0, `model` in the single-device layout (a copy when experts are sharded); other ranks get `model`.
    A collective when experts are sharded: every rank calls it."""
    if not sharded_parameters(model):
        return model
    sd = get_model_state_dict(model, options=_FULL)
    if not sd:  # not rank 0
        return model
    full = Transformer(model.config)
    full.load_state_dict(sd)
    return full
