"""GRPO's objective against hand computations and definitions; config errors; prompts and rows; sandboxed rewards."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import pytest
import torch

from openseek.train.config import train_preset
from openseek.train.grpo import Rows, group_advantages, grpo_loss, kl_estimate, token_terms
from openseek.train.rewards import Sandbox, score, total_reward
from openseek.train.rollout import Completion, PromptLoader, build_rows, rollout_seed
from openseek.train.tasks import PROGRAMS, arithmetic_problems, get_task


def hand_objective(logp, old, ref, adv, eps, beta):
    """J and dJ/dlogp of one token, from the formulas written out (no torch)."""
    rho = math.exp(logp - old)
    surrogate = min(rho * adv, min(max(rho, 1 - eps), 1 + eps) * adv)
    unclipped_taken = rho * adv <= min(max(rho, 1 - eps), 1 + eps) * adv
    d_surrogate = rho * adv if unclipped_taken else 0.0  # d(rho A)/dlogp = rho A; the clipped branch is constant
    kl = math.exp(ref - logp) - (ref - logp) - 1
    d_kl = -math.exp(ref - logp) + 1
    return surrogate - beta * kl, d_surrogate - beta * d_kl


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_loss_and_gradient_match_a_hand_computation(norm):
    # row 0: three tokens, advantage +1.2; row 1: two tokens, advantage -0.7; some ratios outside [0.8, 1.2]
    logp = [-1.0, -0.5, -2.0, -0.3, -1.5]
    old = [-1.1, -0.9, -2.0, -0.2, -1.0]
    ref = [-1.3, -0.4, -1.0, -0.6, -1.5]
    adv_row, row = [1.2, -0.7], [0, 0, 0, 1, 1]
    eps, beta = 0.2, 0.1
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    terms = token_terms(lp, torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                        torch.tensor([adv_row[r] for r in row], dtype=torch.float64), eps, beta)
    loss = grpo_loss(terms.objective, torch.tensor(row), norm, n_rows=2, n_tokens=5)
    loss.backward()
    J = [hand_objective(a, b, c, adv_row[r], eps, beta) for a, b, c, r in zip(logp, old, ref, row)]
    if norm == "sequence":  # 1/G sum_i 1/|o_i| sum_t J_it
        lengths = [3, 3, 3, 2, 2]
        expect_loss = -(sum(j for (j, _), r in zip(J, row) if r == 0) / 3 + sum(j for (j, _), r in zip(J, row)
                                                                              if r == 1) / 2) / 2
        expect_grad = [-d / n / 2 for (_, d), n in zip(J, lengths)]
    else:
        expect_loss = -sum(j for j, _ in J) / 5
        expect_grad = [-d / 5 for _, d in J]
    assert loss.item() == pytest.approx(expect_loss, abs=1e-12)
    assert lp.grad.tolist() == pytest.approx(expect_grad, abs=1e-12)
    # tokens 1 (rho = e^0.4 > 1.2 with A > 0) and 4 (rho = e^-0.5 < 0.8 with A < 0) take the clipped branch
    assert terms.clipped.tolist() == [False, True, False, False, True]


def test_advantages_normalise_each_group_and_ties_get_zero():
    rewards = [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0], [0.3, 0.3, 0.3, 0.3]]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    for r, a in zip(rewards, adv.tolist()):
        if len(set(r)) == 1:
            assert a == [0.0] * 4  # all tied: no signal, and no 0/0
        else:
            m, s = statistics.mean(r), statistics.stdev(r)
            assert a == pytest.approx([(x - m) / s for x in r], abs=1e-12)
    assert not torch.isnan(adv).any()


def test_kl_estimator_is_the_definition_and_unbiased():
    pi, ref = 0.25, 0.4
    assert kl_estimate(torch.tensor(math.log(pi)), torch.tensor(math.log(ref))).item() == pytest.approx(
        ref / pi - math.log(ref / pi) - 1, rel=1e-6)
    # its expectation under pi is KL(pi || ref) = sum pi log(pi / ref), exactly and by sampling
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    kl = (p * (p / q).log()).sum().item()
    k3 = kl_estimate(p.log(), q.log())
    assert (p * k3).sum().item() == pytest.approx(kl, rel=1e-12)
    assert (k3 >= 0).all()
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert k3[draws].mean().item() == pytest.approx(kl, rel=0.02)


def test_config_refuses_a_group_of_one_an_unknown_task_and_a_missing_init():
    with pytest.raises(ValueError, match="group_size=1 is invalid: must be >= 2") as e:
        train_preset("grpo", init="somewhere", group_size=1)
    assert e.value.field == "group_size"
    with pytest.raises(ValueError, match="task='sudoku' is invalid: unknown task; allowed: .*arithmetic"):
        train_preset("grpo", init="somewhere", task="sudoku")
    with pytest.raises(ValueError, match="grpo=True needs init"):
        train_preset("grpo")
    with pytest.raises(ValueError, match="loss_norm='batch' is invalid: allowed: sequence, token"):
        train_preset("grpo", init="somewhere", loss_norm="batch")
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        get_task("sudoku")


def test_prompt_loader_splits_a_step_over_ranks_and_resumes():
    single = PromptLoader(10, 4, seed=3)
    steps = [single.next() for _ in range(5)]  # 20 prompts: two epochs
    first_epoch = [i for s in steps for i, pos in s if pos < 10]
    assert sorted(first_epoch) == list(range(10))  # without replacement within an epoch
    ranks = [PromptLoader(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in steps:
        assert ranks[0].next() + ranks[1].next() == s
    resumed = PromptLoader(10, 4, seed=3)
    resumed.load_state_dict(PromptLoader(10, 4, seed=3).state_dict() | {"position": 12})
    assert resumed.next() == steps[3]
    assert rollout_seed(0, 5) == rollout_seed(0, 5) != rollout_seed(0, 6)


def test_rows_mark_exactly_the_completion_tokens():
    prompts = [[5, 6, 7], [8, 9]]
    groups = [[Completion([1, 2], [-0.1, -0.2], ""), Completion([3], [-0.3], "")],
              [Completion([4, 4, 4], [-0.4, -0.5, -0.6], ""), Completion([2, 1], [-0.7, -0.8], "")]]
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    (rows, sampled), = build_rows(prompts, groups, adv, chunks=1)
    targets = rows.tokens[:, 1:]
    assert [targets[b][rows.mask[b]].tolist() for b in range(4)] == [[1, 2], [3], [4, 4, 4], [2, 1]]
    assert sampled.tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8])
    assert rows.adv.tolist() == [1.0, -1.0, 0.5, -0.5] and rows.row_M.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    halves = build_rows(prompts, groups, adv, chunks=2)
    assert [len(r.adv) for r, _ in halves] == [2, 2]  # whole groups per micro-batch


def test_arithmetic_rewards_and_held_out_split():
    task = get_task("arithmetic")
    train, held = task.problems("train"), task.problems("heldout")
    assert len(train) + len(held) == 20_000 and 1500 < len(held) < 2500
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert task.problems("heldout") == held  # deterministic
    p = next(p for p in arithmetic_problems() if p.prompt == "What is 47 - 58?")
    assert p.answer == "-11"
    items = [{"completion": "The answer is -11.", "answer": "-11"}, {"completion": "-11", "answer": "-11"},
             {"completion": "The answer is 11.", "answer": "-11"}, {"completion": "", "answer": "-11"}]
    parts = score(task.program, task.function, items, Sandbox())
    assert parts == [{"correct": 1.0, "format": 1.0}, {"correct": 1.0, "format": 0.0},
                     {"correct": 0.0, "format": 1.0}, {"correct": 0.0, "format": 0.0}]
    assert [total_reward(x, task.weights) for x in parts] == pytest.approx([1.1, 1.0, 0.1, 0.0])


BAD_PROGRAM = '''
import os, sys, time

def reward(completion, answer):
    if answer == "hang":
        while True:
            pass
    if answer == "sleep":
        time.sleep(60)
    if answer == "crash":
        os._exit(3)
    if answer == "raise":
        raise RuntimeError("boom")
    if answer == "garbage":
        print("not json {")
        return "garbage"
    if answer == "nan":
        return {"correct": float("nan")}
    if answer == "memory":
        return {"correct": len(bytearray(1 << 31))}
    if answer == "network":
        import socket
        socket.create_connection(("127.0.0.1", 9))
    print("noise on stdout")
    return {"correct": 1.0}
'''


def test_a_reward_that_hangs_crashes_or_answers_garbage_scores_zero(tmp_path):
    program = tmp_path / "bad.py"
    program.write_text(BAD_PROGRAM)
    answers = ["ok", "hang", "crash", "raise", "garbage", "nan", "memory", "network", "sleep", "ok"]
    t = time.perf_counter()
    parts = score(program, "reward", [{"completion": "x", "answer": a} for a in answers], Sandbox(timeout=1.0))
    elapsed = time.perf_counter() - t
    assert parts == [{"correct": 1.0}] + [None] * 8 + [{"correct": 1.0}]
    assert [total_reward(x, {"correct": 1.0}) for x in parts] == [1.0] + [0.0] * 8 + [1.0]
    assert elapsed < 10  # the batch's timeout, then each item alone: two timeouts of 1 s and fast failures
    missing = score(tmp_path / "nowhere.py", "reward", [{"completion": "x", "answer": "1"}], Sandbox(timeout=1.0))
    assert missing == [None]


def test_largest_task_answers_the_maximum_and_holds_out_distinct_prompts():
    task = get_task("largest")
    train, held = task.problems("train"), task.problems("heldout")
    assert len(train) + len(held) == 20_000 and not {p.prompt for p in train} & {p.prompt for p in held}
    for p in held[:50]:
        numbers = [int(x) for x in p.prompt.removeprefix("Which is largest: ").rstrip("?").replace(" or", ",")
                   .split(", ")]
        assert len(set(numbers)) == 3 and p.answer == str(max(numbers)) and p.solution == f"The answer is {p.answer}."
