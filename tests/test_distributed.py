"""Distributed training on 2 gloo processes over loopback: data and expert parallelism reproduce one process."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor.parallel import parallelize_module

from openseek.model.moe import Experts
from openseek.train import distributed
from openseek.train.config import TRAIN_PRESETS, train_preset
from openseek.train.run import train

V3_ROUTER = dict(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1)



def tiny(corpus, **kw):
    # clip=0.2 keeps gradient clipping active, so the global norm over sharded experts is tested too
    base = dict(data=[str(corpus)], vocab_size=300, seq_len=32, batch_size=8, steps=10, eval_every=5,
                save_every=5, warmup=2, val_fraction=0.2, clip=0.2)
    return train_preset("tiny", **{**base, **kw})


def _worker(rank: int, world_size: int, port: int, jobs: list, init_group: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 processes on 2 cores
    if init_group:  # once for several train() calls, which use a group they find and leave it alone
        dist.init_process_group("gloo")
    try:
        for fn, args, kw in jobs:
            fn(*args, **kw)
    finally:
        if init_group:
            dist.destroy_process_group()
    # done and passed: leave without the interpreter's finalisation, where gloo's C++ threads can still be torn down
    # and abort the process ("terminate called without an active exception": once in four CI runs, after every
    # check had passed; pytorch/pytorch#179291 describes the race)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_2_ranks(jobs: list, init_group: bool = True, timeout: float = 120) -> None:
    """fn(*args, **kw) for each (fn, args, kw) in turn, in 2 processes joined by gloo on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_worker, args=(2, port, jobs, init_group), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises when a rank failed
        if time.monotonic() > deadline:  # a deadlock fails the test instead of hanging it
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the 2-rank run did not finish in {timeout} s")


def _check_rank_without_tokens() -> None:
    """Every pair routed to rank 0's experts: rank 1 computes nothing yet joins the backward; its gradient is zero."""
    world = distributed.setup()  # from the environment, as under torchrun
    assert world.owns_group and world.size == 2
    torch.manual_seed(0)
    ref = Experts(4, 8, 6)
    for w in ref.parameters():
        w.data.normal_(std=0.3)
    ep = parallelize_module(copy.deepcopy(ref), world.mesh, distributed.ExpertParallel())
    assert type(ep) is Experts and list(ep.state_dict()) == list(ref.state_dict())  # sharded in place, same names
    with pytest.raises(ValueError, match="world_size=2 is invalid: must divide n_routed_experts=3"):
        parallelize_module(Experts(3, 8, 6), world.mesh, distributed.ExpertParallel())
    g = torch.Generator().manual_seed(world.rank)  # different tokens on each rank
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    weights, ids = torch.rand(5, 2, generator=g), torch.tensor([[0, 1]] * 5)
    y = ep(x, weights, ids)
    y.pow(2).sum().backward()
    x_ref = x.detach().requires_grad_()
    y_ref = ref(x_ref, weights, ids)
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    distributed.average_expert_grads(ep, world)  # the mean over ranks of each rank's loss
    for name in ("w1", "w2", "w3"):
        full = getattr(ref, name).grad / 2
        dist.all_reduce(full)
        torch.testing.assert_close(getattr(ep, name).grad.to_local(), full.chunk(2)[world.rank], atol=1e-5, rtol=1e-5)
    assert world.rank == 0 or not ep.w1.grad.to_local().any()
    distributed.teardown(world)


def _record_groups(path) -> None:
    """Append this rank's count of live process groups to path.rank{r}."""
    from torch.distributed import distributed_c10d

    with open(f"{path}.rank{dist.get_rank()}", "a") as f:
        f.write(f"{len(distributed_c10d._world.pg_map)}\n")


def read(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(single, multi):
    a, b = read(single), read(multi)
    ta, tb = [r for r in a if r["kind"] == "train"], [r for r in b if r["kind"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == list(range(1, 11))
    for ra, rb in zip(ta, tb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5, rel=0), ra["step"]
        assert ra["aux"].keys() == rb["aux"].keys()
        for k in ra["aux"]:
            assert rb["aux"][k] == pytest.approx(ra["aux"][k], abs=1e-5, rel=0), (ra["step"], k)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]
    assert sum(r["grad_norm"] > 0.2 for r in ta) >= 3  # clipping was active
    va, vb = [r for r in a if r["kind"] == "val"], [r for r in b if r["kind"] == "val"]
    assert [r["tokens"] for r in va] == [r["tokens"] for r in vb]
    assert [r["loss"] for r in vb] == pytest.approx([r["loss"] for r in va], abs=1e-5, rel=0)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One-process references and the 2-process runs: data parallel (V2 losses, device-limited routing) and expert
    parallel (V3 router, bias update, sequence-wise loss, gradient accumulation; stopped at step 5 and resumed)."""
    root = tmp_path_factory.mktemp("runs")
    dp = tiny(corpus, alpha2=0.05, alpha3=0.02, n_devices=2, device_limit=1)
    ep = tiny(corpus, model={**TRAIN_PRESETS["tiny"]["model"], **V3_ROUTER}, grad_accum=2, alpha1=0.003,
              seq_aux_alpha=0.01, bias_update_speed=0.01, expert_parallel=True)
    torch.manual_seed(0)
    train(dp, root / "dp1", progress=False)
    train(ep, root / "ep1", progress=False)  # expert_parallel is a no-op in a world of one
    run_on_2_ranks([(_record_groups, (root / "groups",), {}),
                    (train, (dp, root / "dp2"), {"progress": False}),
                    (train, (ep, root / "ep2"), {"progress": False, "stop_at": 5}),
                    (train, (ep, root / "ep2"), {"progress": False, "resume": True}),
                    (_record_groups, (root / "groups",), {})])
    return root


def test_trainings_in_one_world_leave_no_process_groups_behind(runs):
    for rank in (0, 1):  # three train() calls in the caller's group, each with DDP's own group, closed after
        before, after = (runs / f"groups.rank{rank}").read_text().split()
        assert after == before


def test_data_parallel_matches_one_process(runs):
    assert_same_run(runs / "dp1", runs / "dp2")


def test_expert_parallel_with_resume_matches_one_process(runs):
    assert_same_run(runs / "ep1", runs / "ep2")
    assert any(r["aux"]["seq_balance"] > 0 for r in read(runs / "ep2") if r["kind"] == "train")


def test_expert_parallel_checkpoint_and_export_hold_the_full_model(runs):
    from transformers import AutoModelForCausalLM

    import openseek
    one, two = load_file(runs / "ep1" / "model" / "model.safetensors"), \
        load_file(runs / "ep2" / "model" / "model.safetensors")
    assert one.keys() == two.keys() and any(".mlp.experts.7." in k for k in two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    assert (one["model.layers.1.mlp.gate.e_score_correction_bias"] != 0).any()  # the bias moved, identically
    ckpt1, ckpt2 = (torch.load(runs / r / "checkpoints" / "ckpt-0000010.pt", weights_only=False)
                    for r in ("ep1", "ep2"))
    for k, v in ckpt1["model"].items():
        torch.testing.assert_close(ckpt2["model"][k], v, atol=1e-5, rtol=0, msg=k)
    for i, s in ckpt1["optimizer"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(ckpt2["optimizer"]["state"][i][k], v, atol=1e-5, rtol=1e-3)
    path = runs / "ep2" / "model"
    ours = openseek.load_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_expert_parallel_rank_without_tokens_joins_backward_with_zero_gradient():
    run_on_2_ranks([(_check_rank_without_tokens, (), {})], init_group=False)


def test_world_size_must_split_the_batch_and_the_experts():
    cfg = train_preset("tiny", batch_size=8, expert_parallel=True)
    cfg.check_world(4)
    with pytest.raises(ValueError, match="world_size=3 must divide n_routed_experts=8"):
        train_preset("tiny", batch_size=6, expert_parallel=True).check_world(3)
    with pytest.raises(ValueError, match="micro-batch must be divisible by world_size=3"):
        cfg.check_world(3)


def test_expert_parallel_checkpoint_resumes_in_one_process(runs, corpus, tmp_path):
    import shutil
    ep = tiny(corpus, model={**TRAIN_PRESETS["tiny"]["model"], **V3_ROUTER}, grad_accum=2, alpha1=0.003,
              seq_aux_alpha=0.01, bias_update_speed=0.01, expert_parallel=True)
    out = tmp_path / "ep2to1"
    shutil.copytree(runs / "ep2" / "data", out / "data")  # the same tokenizer and shards
    (out / "checkpoints").mkdir()
    shutil.copy(runs / "ep2" / "checkpoints" / "ckpt-0000005.pt", out / "checkpoints")
    train(ep, out, resume=True, progress=False)
    one = {r["step"]: r for r in read(runs / "ep1") if r["kind"] == "train"}
    resumed = [r for r in read(out) if r["kind"] == "train"]
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for r in resumed:
        assert r["loss"] == pytest.approx(one[r["step"]]["loss"], abs=1e-5, rel=0), r["step"]
        assert r["grad_norm"] == pytest.approx(one[r["step"]]["grad_norm"], rel=1e-4), r["step"]
