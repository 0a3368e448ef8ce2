"""The MoE recipe inside training steps: token dropping's exempt sequences over a run and over ranks, V3's bias
update beside validation, the presets' device-limited routing."""

from __future__ import annotations

import pytest
import torch

from openseek.model import Transformer
from openseek.model.moe import MoE
from openseek.train.config import TRAIN_PRESETS, train_preset
from openseek.train.step import build_optimizer, build_recipe, evaluate, init_weights, lm_loss, train_step


class _Rank:
    """train_step's Parallel for one rank of a simulated world: no communication (exemption needs none)."""

    def __init__(self, model: Transformer, rank: int, size: int):
        self.model, self.rank, self.size = model, rank, size

    def loss(self, x, y, sync):
        return lm_loss(self.model, x, y, torch.float32)

    def finish_grads(self):
        pass

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()


def kept_sequences(micro: int, n: int, rank: int = 0, size: int = 1) -> dict[int, bool]:
    """Run-wide sequence index -> whether all its (token, expert) pairs were kept, over n sequences of training
    with micro-batches of `micro` rows, 2 per step per rank, as rank `rank` of `size` (the loader's row layout)."""
    # capacity 1e-3: every device is over its budget of 0 pairs, so exactly the exempt sequences keep all pairs
    cfg = train_preset("tiny", vocab_size=64, seq_len=4, batch_size=2 * micro * size, grad_accum=2,
                       capacity_factor=1e-3)
    torch.manual_seed(0)
    model = Transformer(cfg.model_config())
    init_weights(model, 0.02, 0)
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    kept, hook = [], moe.route_hook

    def spy(moe, x, *routing):
        w = hook(moe, x, *routing)
        kept.extend((w != 0).view(x.shape[0], -1).all(1).tolist())
        return w

    moe.route_hook = spy
    g, local, index = torch.Generator().manual_seed(0), 2 * micro, []
    for step in range(n // cfg.batch_size):
        x = torch.randint(0, 64, (cfg.batch_size, cfg.seq_len + 1), generator=g)[rank * local:(rank + 1) * local]
        index += range(step * cfg.batch_size + rank * local, step * cfg.batch_size + (rank + 1) * local)
        train_step(model, opt, recipe, list(zip(x[:, :-1].split(micro), x[:, 1:].split(micro))), cfg, cfg.lr,
                   torch.float32, None if size == 1 else _Rank(model, rank, size))
    assert len(kept) == len(index)
    return dict(zip(index, kept))


@pytest.mark.parametrize("micro", [1, 2, 4, 16])
def test_a_tenth_of_a_runs_sequences_are_never_dropped_at_any_micro_batch_size(micro):
    """The exempt count was floored per micro-batch: no sequence exempt below 10 per micro-batch, 1 in 16 at 16."""
    n = 160
    kept = kept_sequences(micro, n)
    assert sorted(kept) == list(range(n))
    kept = [kept[i] for i in range(n)]
    assert sum(kept) == n // 10  # 10% over the run
    assert all(sum(kept[i:i + 10]) == 1 for i in range(0, n, 10))  # and spread evenly through it


def test_ranks_exempt_the_sequences_one_process_exempts():
    """Data parallelism splits each batch's rows over the ranks; the exempt ones keep their run-wide numbers."""
    one = kept_sequences(2, 40)
    two = {**kept_sequences(2, 40, rank=0, size=2), **kept_sequences(2, 40, rank=1, size=2)}
    assert two == one and [i for i in range(40) if one[i]] == [9, 19, 29, 39]


def test_evaluation_between_steps_leaves_the_bias_update_alone():
    """Validation forwards added their expert loads to those pending for V3's bias update: the first update after
    each validation counted validation routing."""
    v3 = {**TRAIN_PRESETS["tiny"]["model"], "scoring_func": "sigmoid", "topk_method": "noaux_tc",
          "norm_topk_prob": True}
    cfg = train_preset("tiny", model=v3, vocab_size=64, seq_len=8, batch_size=4, bias_update_speed=0.01)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 64, (4, 9), generator=g) for _ in range(3)]
    val = torch.randint(0, 64, (16, 9), generator=g)  # more tokens than a step's: its loads would dominate

    def biases(validate: bool) -> list[torch.Tensor]:
        model = Transformer(cfg.model_config())
        init_weights(model, 0.05, 0)
        recipe = build_recipe(cfg)
        recipe.install(model)
        opt = build_optimizer(model, cfg)
        for i, x in enumerate(steps):
            if validate and i > 0:
                evaluate(model, [(val[:, :-1], val[:, 1:])], torch.float32)
            train_step(model, opt, recipe, [(x[:, :-1], x[:, 1:])], cfg, cfg.lr, torch.float32)
        return [m.gate.bias.clone() for m in model.modules() if isinstance(m, MoE)]

    plain, validated = biases(False), biases(True)
    assert any((b != 0).any() for b in plain)
    for a, b in zip(plain, validated):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("preset", [name for name, p in TRAIN_PRESETS.items() if p.get("n_devices", 1) > 1])
def test_presets_with_device_groups_limit_some_tokens_routing(preset, caplog):
    """The `small` preset routed its top-2 to at most 2 of 4 device groups: a limit that changed no selection."""
    cfg = train_preset(preset)
    moe = MoE(cfg.model_config())
    torch.manual_seed(0)
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(256, moe.gate.weight.shape[1])
    free = moe.gate(x)[1]
    with caplog.at_level("WARNING", logger="openseek.train.moe_recipe"):
        build_recipe(cfg).install(moe)
    assert not caplog.records
    limited = moe.gate(x)[1]
    per_group = moe.gate.weight.shape[0] // cfg.n_devices
    assert max(len({i // per_group for i in row}) for row in limited.tolist()) <= cfg.device_limit
    assert any(set(a) != set(b) for a, b in zip(free.tolist(), limited.tolist()))
