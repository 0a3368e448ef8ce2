"""GRPO end to end on a tiny policy: rollouts from the engine over the trained tensors, learning a trivially
learnable reward, exact resume, rewards that fail, the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openseek.cli import engine_sampler
from openseek.config import ModelConfig
from openseek.model import Transformer, load_pretrained, save_pretrained
from openseek.tokenizer import Tokenizer
from openseek.train.config import _TINY_MODEL, TrainConfig
from openseek.train.rollout import encode_prompt
from openseek.train.run import train
from openseek.train.step import build_optimizer, init_weights
from openseek.train.tasks import Problem, Task, register

LETTERS = "def reward(completion, answer):\n    return {'correct': sum(c in 'abcdefghijklmnopqrstuvwxyz' " \
          "for c in completion) / max(len(completion), 1)}\n"
FAILING = "import os, time\n\ndef reward(completion, answer):\n    if answer == 'crash':\n        os._exit(1)\n" \
          "    if answer == 'hang':\n        time.sleep(30)\n    return {'correct': 1.0}\n"


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny random MoE policy with a byte-level BPE tokenizer and V2-Chat's template."""
    from tokenizers_util import write_test_tokenizer
    root = tmp_path_factory.mktemp("policy")
    vocab = write_test_tokenizer(root)
    cfg = ModelConfig(**{**_TINY_MODEL, "vocab_size": vocab, "max_position_embeddings": 256,
                         "bos_token_id": vocab - 2, "eos_token_id": vocab - 1})
    model = Transformer(cfg)
    init_weights(model, 0.02, 0)
    save_pretrained(model, root)
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("programs")
    (root / "letters.py").write_text(LETTERS)
    (root / "failing.py").write_text(FAILING)
    register(Task("test-letters", lambda: [Problem(f"Say {i}.", "", "") for i in range(64)], root / "letters.py",
                  "reward"))
    answers = ["ok", "crash", "ok", "hang"]
    register(Task("test-failing", lambda: [Problem(f"Say {i}.", answers[i % 4], "") for i in range(40)],
                  root / "failing.py", "reward"))


def grpo(policy, **kw) -> TrainConfig:
    base = dict(grpo=True, task="test-letters", init=str(policy), batch_size=4, group_size=8, steps=15, lr=1e-2,
                warmup=0, eval_every=5, save_every=5, eval_problems=4, max_new_tokens=8, device="cpu")
    return TrainConfig(**{**base, **kw})


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_raises_a_trivially_learnable_reward(policy, tasks, tmp_path):
    path = train(grpo(policy), tmp_path / "run", progress=False, sampler_factory=engine_sampler)
    assert path is not None and (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    recs = read(tmp_path / "run")
    rewards = [r["reward"] for r in recs if r["kind"] == "train"]
    assert len(rewards) == 15
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    last = [r for r in recs if r["kind"] == "train"][-1]
    for key in ("reward_parts", "kl", "entropy", "clip_fraction", "tied_groups", "response_length",
                "rollout_tokens_per_s", "tokens_per_s", "aux", "moe"):
        assert key in last, key
    assert last["kl"] > 0 and 0 < last["response_length"] <= 8 and last["entropy"] > 0
    # the engine samples from the weights the update computes with: float32 round-off only
    assert all(r["logprob_mismatch"] < 1e-4 for r in recs if r["kind"] == "train")
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 5, 10, 15]
    from openseek.train.plot import plot
    paths = plot(tmp_path / "run")
    assert paths[-1].name == "grpo.png" and paths[-1].stat().st_size > 10_000


def test_stop_and_resume_reproduces_the_uninterrupted_run(policy, tasks, tmp_path):
    cfg = grpo(policy, steps=5, save_every=2, eval_every=2, grpo_mu=2, loss_norm="token", temperature=0.9)
    train(cfg, tmp_path / "whole", progress=False, sampler_factory=engine_sampler)
    assert train(cfg, tmp_path / "split", stop_at=3, progress=False, sampler_factory=engine_sampler) is None
    assert train(cfg, tmp_path / "split", resume=True, progress=False, sampler_factory=engine_sampler) is not None
    timing = ("rollout_tokens_per_s", "tokens_per_s")
    a, b = ([{k: v for k, v in r.items() if k not in timing} for r in read(tmp_path / d)] for d in ("whole", "split"))
    assert len([r for r in a if r["kind"] == "train"]) == 5
    assert a == b  # bit for bit: rollouts (the sampler's seeds), rewards, updates, held-out pass@1
    assert any(r.get("clip_fraction", 0) > 0 for r in a)  # mu = 2: the second update sees ratios != 1


def test_engine_rollouts_use_the_current_weights_after_an_optimizer_step(policy, tasks):
    model = load_pretrained(policy, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(policy)
    sampler = engine_sampler(model, tokenizer, 64, 8)
    prompt = encode_prompt(tokenizer, "Say 1.")
    opt = build_optimizer(model, grpo(policy, lr=1e-2))
    model(torch.tensor([prompt])).logsumexp(-1).mean().backward()
    opt.step()  # every matrix moves by about lr, wkv_b included

    def gap(completion) -> float:
        """Largest |engine log-prob - a plain full forward's| over the completion's tokens."""
        ids = prompt + completion.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, len(prompt) - 1:-1].float(), -1)
        ref = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        return (ref - torch.tensor(completion.logprobs)).abs().max().item()

    stale = sampler.sample([prompt], [7], 2, 1.0, 8)[0]
    assert all(len(c.token_ids) > 1 for c in stale)  # decode steps, which read the absorbed W_UK / W_UV
    assert max(map(gap, stale)) > 1e-3  # without renewal the engine samples from the old attention weights
    sampler.renew_weights()
    fresh = sampler.sample([prompt], [7], 2, 1.0, 8)[0]
    assert max(map(gap, fresh)) < 1e-4


def test_llm_generate_takes_one_sampling_params_per_prompt(policy):
    from openseek import LLM, SamplingParams
    llm = LLM(str(policy), max_num_seqs=4)
    params = [SamplingParams(seed=s, n=2, max_tokens=6, ignore_eos=True) for s in (1, 2)]
    both = llm.generate(["Say 1.", "Say 2."], params)
    alone = [llm.generate(p, sp)[0] for p, sp in zip(["Say 1.", "Say 2."], params)]
    assert [[c.token_ids for c in o.outputs] for o in both] == [[c.token_ids for c in o.outputs] for o in alone]
    assert both[0].outputs[0].token_ids != both[1].outputs[0].token_ids or \
        both[0].outputs[1].token_ids != both[1].outputs[1].token_ids  # the seeds differ
    with pytest.raises(ValueError, match="sampling_params holds 1 entries for 2 prompts"):
        llm.generate(["a", "b"], params[:1])


def test_rewards_that_crash_or_hang_count_zero_and_training_goes_on(policy, tasks, tmp_path):
    cfg = grpo(policy, task="test-failing", steps=2, group_size=2, reward_timeout=0.5, eval_every=10,
               eval_problems=1)
    assert train(cfg, tmp_path / "f", progress=False, sampler_factory=engine_sampler) is not None
    recs = [r for r in read(tmp_path / "f") if r["kind"] == "train"]
    assert len(recs) == 2
    assert all(0 < r["reward_failed"] < 1 and r["reward"] == pytest.approx(1 - r["reward_failed"]) for r in recs)


def test_cli_names_an_unknown_task_and_a_group_of_one(policy, tmp_path):
    base = [sys.executable, "-m", "openseek", "train", "--preset", "grpo", "--init", str(policy), "--out",
            str(tmp_path / "c"), "--no-progress"]
    bad = subprocess.run(base + ["--task", "sudoku"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "task='sudoku' is invalid: unknown task; allowed: arithmetic" in bad.stderr
    one = subprocess.run(base + ["--group-size", "1"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "group_size=1 is invalid: must be >= 2" in one.stderr


def _grpo_on_rank(policy: str, programs: str, out: str) -> None:
    """A job for a spawned rank: the test task registered in this process, then GRPO (3 steps)."""
    register(Task("test-letters", lambda: [Problem(f"Say {i}.", "", "") for i in range(64)],
                  Path(programs) / "letters.py", "reward"))
    cfg = grpo(Path(policy), steps=3, eval_every=3, save_every=3, clip=0.05)
    train(cfg, out, progress=False, sampler_factory=engine_sampler)


def test_two_gloo_ranks_match_one_process(policy, tasks, tmp_path):
    from test_distributed import run_on_2_ranks
    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "letters.py").write_text(LETTERS)
    _grpo_on_rank(str(policy), str(programs), str(tmp_path / "one"))
    run_on_2_ranks([(_grpo_on_rank, (str(policy), str(programs), str(tmp_path / "two")), {})], init_group=False,
                   timeout=240)
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    ta, tb = [r for r in a if r["kind"] == "train"], [r for r in b if r["kind"] == "train"]
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == [1, 2, 3]
    for ra, rb in zip(ta, tb):  # each rank samples its prompts with the seeds one process gives them
        for key in ("reward", "response_length", "tied_groups", "loss", "kl", "entropy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["step"], key)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]
    assert all(r["grad_norm"] > 0.05 for r in ta)  # clipping active: the norm is the global one
    ea, eb = [r for r in a if r["kind"] == "eval"], [r for r in b if r["kind"] == "eval"]
    keys = ("pass@1", "pass@1_sampled", "problems")
    assert len(ea) == len(eb) == 2  # steps 0 and 3
    assert [r[k] for r in eb for k in keys] == pytest.approx([r[k] for r in ea for k in keys], abs=1e-9)


def test_sft_on_a_tasks_demonstrations_trains_on_the_answers_and_validates_on_held_out(policy, tmp_path):
    from openseek.train.run import prepare_data
    from openseek.train.tasks import get_task
    cfg = TrainConfig(sft=True, task="largest", init=str(policy), seq_len=64, batch_size=4, steps=2, warmup=0,
                      eval_every=2, eval_batches=1, save_every=2, device="cpu")
    prepared = prepare_data(cfg, tmp_path / "p")
    tokenizer = Tokenizer.from_pretrained(policy)
    task = get_task("largest")
    assert prepared.train.num_examples == len(task.problems("train"))  # every demonstration fits a row
    assert prepared.val.num_examples == len(task.problems("heldout"))
    assert prepared.train.num_bytes == sum(len(p.solution) for p in task.problems("train"))
    text = tokenizer.decode(prepared.val.inputs[0].tolist(), skip_special_tokens=False)
    assert "Which is largest:" in text and "The answer is" in text
    assert train(cfg, tmp_path / "sft", progress=False) is not None
    assert [r["step"] for r in read(tmp_path / "sft") if r["kind"] == "val"] == [2]


def test_v3_bias_update_runs_during_grpo(tasks, tmp_path):
    """The MoE recipe stays on in RL: with bias_update_speed the routers' selection bias moves after each step."""
    from tokenizers_util import write_test_tokenizer
    vocab = write_test_tokenizer(tmp_path / "v3")
    cfg = ModelConfig(**{**_TINY_MODEL, "vocab_size": vocab, "max_position_embeddings": 256, "bos_token_id": vocab - 2,
                         "eos_token_id": vocab - 1, "model_type": "deepseek_v3", "scoring_func": "sigmoid",
                         "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1})
    model = Transformer(cfg)
    init_weights(model, 0.02, 0)
    save_pretrained(model, tmp_path / "v3")
    out = train(grpo(tmp_path / "v3", steps=2, bias_update_speed=0.01, seq_aux_alpha=0.001), tmp_path / "run",
                progress=False, sampler_factory=engine_sampler)
    bias = load_pretrained(out).layers[1].ffn.gate.bias
    assert bias.abs().max().item() == pytest.approx(0.02, abs=1e-6)  # two steps of +-0.01 on some expert
    rec = [r for r in read(tmp_path / "run") if r["kind"] == "train"][-1]
    assert set(rec["aux"]) == {"expert_balance", "seq_balance"}
