"""bench/ablation.py: the verdict rule on hand-made differences, equal parameters and FLOPs of the MoE pair, MLA's
cache ratio, the learning-rate plan, resuming from saved runs, and its MHA module against attention written out by
hand. The quick setting trains every planned run for a few steps."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def ablation():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # the bench scripts import their shared `common` module by name
        import ablation
        import ablation_report
    return ablation, ablation_report


@pytest.fixture(scope="module")
def models(ablation):
    """bench/ablation_models.py, which ablation.py imported: the settings, the MHA module, the counts."""
    return sys.modules["ablation_models"]


@pytest.fixture(scope="module")
def quick(ablation, corpus, tmp_path_factory):
    """(setting, OUT, runs trained, DOCS) of the quick ablation on the shared tiny corpus: 2 learning rates, 2 seeds."""
    ab, report = ablation
    s = dataclasses.replace(ab.QUICK, steps=8, vocab=300, lr_factors=(1.0, 2.0), seeds=(0, 1))
    out = tmp_path_factory.mktemp("ablation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = ab.run_ablation(s, out, [str(corpus)], workers=1)
    finally:
        torch.set_num_threads(threads)
    report.render(s, out, out / "docs", "python bench/ablation.py --quick", "a test corpus")
    return s, out, trained, out / "docs"


def test_every_planned_run_trains_to_a_finite_loss_below_uniform_and_is_saved(ablation, quick):
    ab, report = ablation
    s, out, trained, _ = quick
    runs = ab.load_runs(out)
    swept = [k for k, v in ab.VARIANTS.items() if v.swept]
    recipe = [k for k, v in ab.VARIANTS.items() if not v.swept]
    # each swept variant at 2 lrs (seed 0) + seed 1 at its best + a check beyond its best (of 2, always at an edge);
    # each recipe variant at 2 seeds
    assert trained == len(runs) == 2 * len(swept) + len(swept) + len(swept) + 2 * len(recipe)
    assert len(ab.edge_runs(s, runs)) == len(swept)
    for r in runs.values():
        assert len(r["train_loss"]) == s.steps and all(math.isfinite(x) for x in r["train_loss"]), r["name"]
        assert math.isfinite(r["bpb"]), r["name"]
        assert (r["maxvio_batch"] is None) == (ab.VARIANTS[r["variant"]].ffn == "dense"), r["name"]
    chosen = [r for rs in report.chosen(s, runs).values() for r in rs]
    assert len(chosen) == len(ab.VARIANTS) * len(s.seeds)
    assert all(r["val_loss"] < math.log(s.vocab) for r in chosen)  # below uniform at the chosen lr (8 steps)
    assert all(r["dropped_fraction"] > 0 for r in runs.values() if r["variant"] == "dropping")
    assert all(r["dropped_fraction"] == 0 for r in runs.values() if r["variant"] != "dropping")


def test_docs_hold_the_tables_the_verdicts_and_the_plot(quick):
    _, _, _, docs = quick
    text = (docs / "ablation.md").read_text()
    for heading in ("Learning-rate sweep", "Claims", "Token budget", "## Discussion"):
        assert heading in text, heading
    assert any(v in text for v in ("reproduced", "not settled at this scale", "contradicted"))
    assert "Missing runs" not in text
    assert (docs / "ablation.png").stat().st_size > 10_000


def test_resume_skips_saved_runs_and_retrains_only_a_missing_one(ablation, quick, corpus):
    ab, _ = ablation
    s, out, _, _ = quick
    first = ab.load_runs(out)
    victim = out / "runs" / f"{next(iter(first))}.json"
    victim.unlink()
    assert ab.run_ablation(s, out, [str(corpus)], workers=1) == 1
    again = ab.load_runs(out)
    assert set(again) == set(first)
    untouched = [k for k in first if k != victim.stem]
    assert all(again[k]["seconds"] == first[k]["seconds"] for k in untouched)
    assert ab.run_ablation(s, out, [str(corpus)], workers=1) == 0


def test_a_seed_fixes_the_init_and_data_order_across_variants(ablation):
    ab, _ = ablation
    s = ab.QUICK
    for seed in (0, 2):
        cfgs = [ab.train_config(s, [], ab.model_fields(s, v), ab.Run(k, 1e-3, seed)) for k, v in ab.VARIANTS.items()]
        assert {c.seed for c in cfgs} == {seed}
    assert ab.train_config(s, []).seed == 0  # one train/validation split for every run


@pytest.mark.parametrize("diffs, sign, want", [
    ([-0.02, -0.03, -0.025], -1, "reproduced"),  # mean -0.025, standard error 0.0029
    ([0.02, 0.03, 0.025], -1, "contradicted"),
    ([-0.02, -0.03, 0.001], -1, "not settled at this scale"),  # one seed disagrees
    ([-0.001, -0.05, -0.002], -1, "not settled at this scale"),  # all agree, but mean 0.0177 < 2 x 0.0162
    ([0.010, 0.012, 0.011], 0, "resolved: worse by 0.0110"),
    ([0.01, -0.01, 0.002], 0, "no difference resolved"),
    ([-0.02], -1, "too few seeds"),
])
def test_verdict_rule_on_hand_made_differences(ablation, diffs, sign, want):
    _, report = ablation
    assert report.verdict(diffs, sign) == want


def test_best_lr_is_the_least_validation_loss_and_recipe_variants_take_deepseekmoe_s(ablation):
    ab, _ = ablation
    s = ab.Setting()
    losses = {0.5: 3.0, 1.0: 2.9, 2.0: 2.95}
    done = {r.name: {"lr": r.lr, "val_loss": losses[r.lr / s.lr] + (0.1 if r.variant == "mha" else 0)}
            for r in ab.sweep_runs(s)}
    best = ab.best_lrs(s, done)
    assert best == {k: s.lr for k, v in ab.VARIANTS.items() if v.swept}
    runs = ab.final_runs(s, {**best, "deepseekmoe": 1e-3})
    assert {r.lr for r in runs if not ab.VARIANTS[r.variant].swept} == {1e-3}
    assert sorted(r.seed for r in runs if r.variant == "mla") == [1, 2]
    assert sorted(r.seed for r in runs if r.variant == "v3-bias") == [0, 1, 2]
    assert ab.edge_runs(s, done) == []  # every best inside the sweep
    done[ab.Run("mha", s.lr / 2, 0).name]["val_loss"] = 2.0  # MHA best at the low edge: a check at half of it
    assert ab.edge_runs(s, done) == [ab.Run("mha", s.lr / 4, 0)]
    del done[ab.Run("mla", s.lr, 0).name]  # an unfinished sweep plans no seeds
    assert "mla" not in ab.best_lrs(s, done)


def build(ab, models, s, key):
    v = ab.VARIANTS[key]
    cfg = ab.train_config(s, [], ab.model_fields(s, v), ab.Run(key, 1e-3, 0))
    with torch.device("meta"):
        model = models.Transformer(cfg.model_config())
        if v.attention == "MHA":
            for block in model.layers:
                block.attn = models.GQA(s.hidden, s.heads, s.heads, s.head_dim)
    return model


def test_deepseekmoe_and_gshard_hold_equal_expert_weights_and_match_params_and_flops(ablation, models):
    ab, _ = ablation
    s = ab.Setting()
    D, I, E = s.hidden, s.ffn, s.experts
    counts = {}
    for key in ("gshard", "deepseekmoe"):
        model = build(ab, models, s, key)
        moes = [m for m in model.modules() if isinstance(m, models.MoE)]
        assert len(moes) == s.layers - 1  # layer 0 dense
        # every layer: 3 D F weights per expert; GShard E x I/2, DeepSeekMoE (4E - 2) x I/8 routed + 2 x I/8 shared
        assert sum(models._numel(m) - models._numel(m.gate) for m in moes) == (s.layers - 1) * 3 * D * I // 2 * E
        total, activated = ab.param_counts(model)
        counts[key] = (total, activated, ab.flops_per_token(s, "MLA", activated))
    for g, d in zip(counts["gshard"], counts["deepseekmoe"]):
        assert abs(d / g - 1) < 0.01, counts  # only the router's (3E - 2) D weights a layer differ
    router_extra = (3 * E - 2) * D * (s.layers - 1)
    assert counts["deepseekmoe"][0] - counts["gshard"][0] == router_extra


def test_mla_caches_four_to_five_times_less_than_mha_at_equal_activated_params(ablation, models):
    ab, _ = ablation
    s = ab.Setting()
    mha, mla = 2 * s.heads * s.head_dim, s.latent + s.head_dim // 2  # K and V of every head; c_kv and k_pe
    assert (ab.kv_values(s, "MHA"), ab.kv_values(s, "MLA")) == (mha, mla) == (384, 88)
    assert 4 <= mha / mla <= 5
    active = {k: ab.param_counts(build(ab, models, s, k))[1] for k in ("mha", "mla")}
    assert abs(active["mla"] / active["mha"] - 1) < 0.002, active
    assert ab.model_fields(s, ab.VARIANTS["mla"])["intermediate_size"] > s.ffn  # MLA's fewer attention weights


def naive_attention(x, wq, wk, wv, wo, H, G, d):
    """Causal softmax attention head by head, RoPE as complex rotation of adjacent pairs, query head h on kv h // (H/G)."""
    S = x.shape[1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = torch.arange(S, dtype=torch.float64)[:, None] * theta  # (S, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)  # e^(i * position * theta)

    def rope(t):  # (B, S, n, d) -> rotated
        c = torch.view_as_complex(t.reshape(*t.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(c * rot[None, :, None]).flatten(-2)

    q = rope((x @ wq.T).view(*x.shape[:2], H, d))
    k = rope((x @ wk.T).view(*x.shape[:2], G, d))
    v = (x @ wv.T).view(*x.shape[:2], G, d)
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(d)  # (B, S, S)
        future = torch.ones(S, S, dtype=torch.bool).triu(1)
        heads.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, :, g])  # (B, S, d)
    return torch.cat(heads, dim=-1) @ wo.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_gqa_matches_naive_causal_attention(models, n_kv_heads):
    torch.manual_seed(0)
    D, H, d = 32, 4, 8
    m = models.GQA(D, H, n_kv_heads, d)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        ours = m(x, None)
    w = [lin.weight.double() for lin in (m.wq, m.wk, m.wv, m.wo)]
    ref = naive_attention(x.double(), *w, H, n_kv_heads, d)  # float64: the reference's own rounding drops out
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_gqa_rejects_groups_that_do_not_divide_the_heads(models):
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        models.GQA(32, 4, 3, 8)


def test_from_results_renders_without_training(ablation, quick, tmp_path, capsys):
    ab, _ = ablation
    s, out, _, _ = quick
    before = {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()}
    ab.main(["--quick", "--steps", str(s.steps), "--vocab-size", str(s.vocab), "--out", str(out), "--docs",
             str(tmp_path), "--from-results"])
    assert {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()} == before
    text = (tmp_path / "ablation.md").read_text()
    assert "## Claims" in text and "Missing runs" not in text  # OUT/setting.json, not --quick's defaults
