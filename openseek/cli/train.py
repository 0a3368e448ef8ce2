"""`openseek train` (pre-training, SFT, GRPO; the GRPO rollout sampler over the engine) and `openseek plot`."""

from __future__ import annotations

import argparse
import dataclasses

from .common import UsageError


def add_train(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TRAIN_PRESETS, TrainConfig

    # allow_abbrev=False: with flags derived from fields, a prefix (--init of --init-std) must not silently match
    p = sub.add_parser("train", help="pre-train, fine-tune (--sft) or RL-train (--grpo) an MLA + DeepSeekMoE model, "
                                     "DeepSeek-V2 recipe",
                       description="Every TrainConfig field is a flag; unset flags keep the preset's value.",
                       allow_abbrev=False)
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(TRAIN_PRESETS)} (default: tiny)")
    p.add_argument("--config", metavar="FILE", help="a TrainConfig JSON file (instead of --preset)")
    p.add_argument("--out", default="out", help="output folder: metrics.jsonl, checkpoints/, model/")
    p.add_argument("--stop-at", type=int, default=None, metavar="K", help="stop cleanly after step K")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(TrainConfig):  # flags derived from the fields: defaults live in one place
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).removesuffix(" | None"))
        if f.name == "data":
            p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="text files or folders")
        elif f.type in (bool, "bool"):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true", default=None)
        elif kind is not None:
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig, train_preset
    from ..train.run import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    try:
        if args.config:
            base = TrainConfig.from_file(args.config).to_dict()
            cfg = TrainConfig(**{**base, **overrides})
        else:
            cfg = train_preset(args.preset, **overrides)
        path = train(cfg, args.out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress,
                     sampler_factory=engine_sampler)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    print(f"exported {path}" if path else f"stopped; continue with --resume --out {args.out}")
    return 0


class EngineSampler:
    """GRPO's rollout sampler (train/rollout.py's protocol): openseek.LLM over the trainer's own Transformer, so the
    rollouts read the very tensors the optimizer updates; the CLI builds it, as train code does not import the
    engine."""

    def __init__(self, model, tokenizer, max_model_len: int, max_num_seqs: int):
        from ..engine import LLM

        self.llm = LLM(model, tokenizer=tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_waiting=max(256, max_num_seqs))

    def sample(self, prompts: list[list[int]], seeds: list[int], n: int, temperature: float, max_tokens: int):
        from ..engine import SamplingParams
        from ..train.rollout import Completion

        params = [SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=max_tokens, logprobs=0)
                  for seed in seeds]
        self.llm.reset_prefix_cache()  # each call computes from the same state: resumed runs draw the same tokens
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [[Completion(c.token_ids, [lp[t] for lp, t in zip(c.logprobs or [], c.token_ids)], c.text)
                 for c in out.outputs] for out in outs]

    def renew_weights(self) -> None:
        self.llm.llm_engine.update_weights()  # MLA's absorbed W_UK / W_UV, and the prefix cache


def engine_sampler(model, tokenizer, max_model_len: int, max_num_seqs: int) -> EngineSampler:
    return EngineSampler(model, tokenizer, max_model_len, max_num_seqs)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="loss curves and the expert-load heat map of a training run (PNG)")
    p.add_argument("out", help="the --out folder of `openseek train`")
    p.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from ..train.plot import plot

    try:
        for path in plot(args.out):
            print(path)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    return 0
