"""`openseek train --grpo`: the RL stage of DeepSeek-V2 on a task's verifiable rewards (grpo.py has the objective).

Each step: the step's prompts (rollout.PromptLoader), G completions each from the engine over the policy's own
tensors, rewards from the task's program in a sandbox (rewards.py), group-relative advantages, then mu optimizer
steps on the clipped objective with the KL penalty to the frozen initial model, the MoE recipe's balance losses
included. After every optimizer step the engine renews its derived weights. Checkpoints, --resume (exact: the
rollout seeds are a function of the prompt's position), metrics.jsonl and torchrun data parallelism are
pre-training's; a group never spans ranks.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import Transformer, load_pretrained
from ..model.moe import MoE
from ..tokenizer import Tokenizer
from . import checkpoint, distributed
from .config import TrainConfig
from .grpo import Rows, completion_logprobs, group_advantages, grpo_loss, token_terms
from .metrics import MetricsLog
from .moe_recipe import MoERecipe
from .rewards import Sandbox, score, total_reward
from .rollout import Completion, PromptLoader, Sampler, SamplerFactory, build_rows, encode_prompt, rollout_seed
from .step import build_optimizer, build_recipe, lr_at
from .tasks import Problem, Task, get_task


def train_grpo(cfg: TrainConfig, out: Path, device: torch.device, resume: bool, stop_at: int | None, progress: bool,
               world: distributed.World, sampler_factory: SamplerFactory | None) -> Path | None:
    """Run (or continue) GRPO from cfg.init; returns the exported model folder when the last step is reached."""
    if sampler_factory is None:
        raise ValueError("GRPO needs a rollout sampler over the policy (`openseek train` passes the engine's: "
                         "openseek.cli.engine_sampler)")
    task = get_task(cfg.task)
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    if tokenizer is None or tokenizer.chat_template is None:
        raise ValueError(f"init={cfg.init}: GRPO needs the model's tokenizer.json with a chat_template")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = load_pretrained(cfg.init, dtype=torch.float32).to(device).train()
    recipe = build_recipe(cfg)
    ref = frozen_reference(model, recipe) if cfg.kl_beta > 0 else None
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    train_set, heldout = task.problems("train"), task.problems("heldout")[:cfg.eval_problems]
    prompts = {p.prompt: encode_prompt(tokenizer, p.prompt) for p in train_set + heldout}
    loader = PromptLoader(len(train_set), cfg.batch_size, cfg.seed, world.rank, world.size)
    step = checkpoint.restore(out, cfg, model, opt, loader, recipe) if resume else 0
    if world.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", step, enabled=world.is_main)
    max_len = max(map(len, prompts.values())) + cfg.max_new_tokens
    seqs = max(cfg.batch_size // world.size * cfg.group_size, len(heldout) // world.size + 1)
    sampler = sampler_factory(model, tokenizer, max_len, seqs)  # after restore: absorbs the restored weights
    run = _Run(cfg, task, model, ref, opt, recipe, sampler, world, prompts)
    if step == 0:
        log.write({"kind": "eval", "step": 0, **run.evaluate(heldout)})
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="grpo", unit="step")
    while step < end:
        rec = run.step([(train_set[i], pos) for i, pos in loader.next()], lr_at(cfg, step))
        step += 1
        log.write({"kind": "train", "step": step, **rec})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log.write({"kind": "eval", "step": step, **run.evaluate(heldout)})
        if step % cfg.save_every == 0 or step == end:
            checkpoint.save(out, step, cfg, model, opt, loader, recipe, world)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.3f}")
    bar.close()
    recipe.remove(model)
    path = checkpoint.export(model, Path(cfg.init), out, world) if step >= cfg.steps else None
    distributed.barrier(world)
    return path


def frozen_reference(model: Transformer, recipe: MoERecipe) -> Transformer:
    """pi_ref: a frozen copy of the initial policy, routed as the policy is (the recipe's device limit, no hook)."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for m in ref.modules():
        if isinstance(m, MoE):
            m.gate.limit_devices(recipe.n_devices, recipe.device_limit)
    return ref


@dataclass
class _Run:
    cfg: TrainConfig
    task: Task
    model: Transformer
    ref: Transformer | None
    opt: torch.optim.Optimizer
    recipe: MoERecipe
    sampler: Sampler
    world: distributed.World
    prompts: dict[str, list[int]]

    def rollouts(self, problems: list[Problem], seeds: list[int], n: int, temperature: float
                 ) -> list[list[Completion]]:
        self.model.eval()  # the engine's forward: no token dropping, no bias-update loads
        try:
            return self.sampler.sample([self.prompts[p.prompt] for p in problems], seeds, n, temperature,
                                       self.cfg.max_new_tokens)
        finally:
            self.model.train()

    def rewards(self, problems: list[Problem], groups: list[list[Completion]]) -> list[list[dict | None]]:
        items = [{"completion": c.text, "answer": p.answer} for p, g in zip(problems, groups) for c in g]
        parts = score(self.task.program, self.task.function, items, Sandbox(self.cfg.reward_timeout,
                                                                            self.cfg.reward_memory_mb))
        n = len(groups[0]) if groups else 0
        return [parts[k * n:(k + 1) * n] for k in range(len(groups))]

    def step(self, batch: list[tuple[Problem, int]], lr: float) -> dict:
        """One rollout batch and its mu optimizer steps -> the metrics record."""
        cfg, G = self.cfg, self.cfg.group_size
        problems = [p for p, _ in batch]
        t0 = time.perf_counter()
        groups = self.rollouts(problems, [rollout_seed(cfg.seed, pos) for _, pos in batch], G, cfg.temperature)
        t_rollout = time.perf_counter() - t0
        parts = self.rewards(problems, groups)
        rewards_PG = torch.tensor([[total_reward(x, self.task.weights) for x in g] for g in parts],
                                  dtype=torch.float32)
        adv_PG = group_advantages(rewards_PG)
        micro = build_rows([self.prompts[p.prompt] for p in problems], groups, adv_PG, cfg.grad_accum)
        t1 = time.perf_counter()
        upd = self.update(micro, lr)
        t_train = time.perf_counter() - t1
        flat = [x for g in parts for x in g]
        names = sorted(self.task.weights)
        local = {"reward": rewards_PG.sum().item(), "reward_failed": float(sum(x is None for x in flat)),
                 "response_length": float(sum(len(c.token_ids) for g in groups for c in g)),
                 "completions": float(len(flat)), "tied": (rewards_PG.std(1) == 0).sum().item(),
                 "groups": float(len(groups)), "tokens": float(upd.pop("tokens")), "loss": upd.pop("loss"),
                 **{f"part.{k}": sum((x or {}).get(k, 0.0) for x in flat) for k in names},
                 **{f"aux.{k}": v for k, v in upd.pop("aux").items()}}
        tot = sum_dict(local, self.world)
        n, W = tot["completions"], self.world.size
        return {"loss": tot["loss"] / W, "reward": tot["reward"] / n,
                "reward_parts": {k: tot[f"part.{k}"] / n for k in names},
                "reward_failed": tot["reward_failed"] / n, "tied_groups": tot["tied"] / tot["groups"],
                "response_length": tot["response_length"] / n, **upd, "lr": lr,
                "aux": {k[4:]: v / W for k, v in tot.items() if k.startswith("aux.")},
                "rollout_tokens_per_s": tot["response_length"] / max(t_rollout, 1e-9),
                "tokens_per_s": tot["tokens"] / max(t_train, 1e-9),
                "moe": [{"layer": int(name.split(".")[1]), "max_over_mean": s["load_max_over_mean"],
                         "cv": s["load_cv"], "dead": s["dead_experts"], "dropped": s["dropped_fraction"]}
                        for name, s in self.recipe.stats().items()]}

    def update(self, micro: list[tuple[Rows, torch.Tensor]], lr: float) -> dict:
        """mu optimizer steps on the rollout batch; pi_old is the policy before the first (its log-probs, detached,
        from the first pass), pi_ref the frozen initial model."""
        cfg, model, world = self.cfg, self.model, self.world
        dtype = getattr(torch, cfg.dtype)
        rows_M = [r.row_M for r, _ in micro]
        n_rows = sum(len(r.adv) for r, _ in micro)
        n_tokens = distributed.sum_over_ranks([float(sum(len(m) for m in rows_M))], world)[0] / world.size
        old, refs, stats = [], [], {"kl": 0.0, "entropy": 0.0, "clipped": 0.0, "mismatch": 0.0}
        losses, aux_sums, grad_norms, tokens = [], {}, [], 0
        for it in range(cfg.grpo_mu):
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            first, total = self.recipe.sequences + world.rank * n_rows, 0.0
            for k, ((rows, sampled), row_M) in enumerate(zip(micro, rows_M)):
                self.recipe.reset(first)
                first += len(rows.adv)
                lp = completion_logprobs(model, rows, cfg.temperature, dtype)
                if it == 0:
                    old.append(lp.logp.detach())
                    refs.append(None if self.ref is None else
                                completion_logprobs(self.ref, rows, cfg.temperature, dtype).logp.detach())
                    stats["entropy"] += lp.entropy.sum().item()
                    stats["mismatch"] += (lp.logp_raw - sampled.to(lp.logp_raw.device)).abs().sum().item()
                terms = token_terms(lp.logp, old[k], refs[k], rows.adv.to(lp.logp.device)[row_M], cfg.clip_eps,
                                    cfg.kl_beta)
                loss = grpo_loss(terms.objective, row_M.to(lp.logp.device), cfg.loss_norm, n_rows, n_tokens)
                aux = self.recipe.step_losses()
                share = len(rows.adv) / n_rows
                (loss + sum(aux.values(), loss.new_zeros(())) * share).backward()
                total += loss.item()
                for name, v in aux.items():
                    aux_sums[name] = aux_sums.get(name, 0.0) + v.item() * share / cfg.grpo_mu
                if it == cfg.grpo_mu - 1:  # the last pass: how far the policy moved from pi_ref and pi_old
                    stats["kl"] += terms.kl.sum().item()
                    stats["clipped"] += terms.clipped.float().sum().item()
                tokens += int(rows.mask.sum()) + sum(rows.prompt_lengths)  # not the padding
            if world.size > 1:
                average_grads(model, self.recipe, world)
            grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=False).item())
            self.opt.step()
            self.recipe.update_bias(model)
            self.recipe.sequences += n_rows * world.size
            self.sampler.renew_weights()
            losses.append(total)
        keys = list(stats)
        sums = distributed.sum_over_ranks([stats[k] for k in keys] + [float(sum(len(m) for m in rows_M))], world)
        mean = {k: v / max(sums[-1], 1) for k, v in zip(keys, sums)}
        return {"loss": sum(losses) / len(losses), "aux": aux_sums, "grad_norm": grad_norms[-1], "kl": mean["kl"],
                "entropy": mean["entropy"], "clip_fraction": mean["clipped"], "logprob_mismatch": mean["mismatch"],
                "tokens": tokens}

    def evaluate(self, heldout: list[Problem]) -> dict:
        """pass@1 on the held-out problems (this rank's share): greedy, and one sample at the rollout temperature."""
        mine = heldout[self.world.rank::self.world.size]
        counts = []
        for temperature in (0.0, self.cfg.temperature):
            seeds = [rollout_seed(self.cfg.seed, -1 - i) for i in range(len(heldout))][self.world.rank::self.world.size]
            groups = self.rollouts(mine, seeds, 1, temperature)
            parts = self.rewards(mine, groups)
            counts.append(sum((g[0] or {}).get("correct", 0.0) for g in parts))
        greedy, sampled, n = distributed.sum_over_ranks([*counts, float(len(mine))], self.world)
        return {"pass@1": greedy / max(n, 1), "pass@1_sampled": sampled / max(n, 1), "problems": int(n)}


def sum_dict(values: dict[str, float], world: distributed.World) -> dict[str, float]:
    """Each value summed over the ranks (the same keys on every rank)."""
    keys = sorted(values)
    return dict(zip(keys, distributed.sum_over_ranks([values[k] for k in keys], world)))


def average_grads(model: Transformer, recipe: MoERecipe, world: distributed.World) -> None:
    """The mean over ranks of every gradient (one all_reduce of a flat buffer; a parameter no token reached on a rank
    counts zeros there), and the V3 bias update's global loads. DDP does this
    during backward; here the policy is also the engine's model, whose forward DDP must not hook."""
    params = [p for p in model.parameters() if p.requires_grad]
    has_grad = torch.tensor([float(p.grad is not None) for p in params])
    flat = torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in params] + [has_grad])
    dist.all_reduce(flat)
    flat[:-len(params)] /= world.size
    for p, g, seen in zip(params, flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):]):
        p.grad = g.view_as(p).clone() if seen > 0 else None  # None on every rank: AdamW skips it, as on one rank
    distributed.sum_loads(recipe.loads())
