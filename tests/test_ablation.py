"""bench/ablation.py in its quick setting: every variant trains, KV cache sizes and activated parameters follow the
shapes, and its GQA module is causal attention as written out by hand."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def ablation():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # the bench scripts import their shared `common` module by name
        import ablation
    return ablation


@pytest.fixture(scope="module")
def quick(ablation, corpus, tmp_path_factory):
    """(setting, results, docs folder) of the quick ablation on the shared tiny corpus."""
    s = dataclasses.replace(ablation.QUICK, steps=8, vocab=300)
    out = tmp_path_factory.mktemp("ablation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy machine's other jobs
    try:
        results, prepared = ablation.run_ablation(s, out, [str(corpus)])
    finally:
        torch.set_num_threads(threads)
    ablation.write_docs(results, s, prepared, out / "docs", "python bench/ablation.py --quick", "a test corpus")
    return s, {r.name: r for r in results}, out / "docs"


def test_every_variant_trains_to_a_finite_loss_below_uniform(quick):
    s, results, docs = quick
    assert list(results) == ["MHA", "GQA", "MQA", "MLA", "GShard", "DeepSeekMoE"]
    for r in results.values():
        assert len(r.train_loss) == s.steps and all(math.isfinite(x) for x in r.train_loss), r.name
        assert math.isfinite(r.bpb) and r.val_loss < math.log(s.vocab), (r.name, r.val_loss)
    text = (docs / "ablation.md").read_text()
    assert "## Discussion" in text and all(f"{r.bpb:.4f}" in text for r in results.values())
    assert (docs / "ablation.png").stat().st_size > 10_000


def test_kv_cache_per_token_follows_the_shapes(quick):
    s, results, _ = quick
    H, d = s.heads, s.head_dim
    expected = {"MHA": 2 * H * d, "GQA": 2 * (H // 2) * d, "MQA": 2 * d, "MLA": 4 * d + d // 2}  # MLA: c_kv + k_pe
    assert {k: results[k].kv_values for k in expected} == expected
    assert results["MLA"].kv_values / (2 * d) == 2.25  # the paper's "GQA with 2.25 groups"
    assert results["GShard"].kv_values == results["DeepSeekMoE"].kv_values == expected["MLA"]


def test_activated_parameters_match_across_variants(quick):
    _, results, _ = quick
    base = results["MLA"].activated
    for name, r in results.items():
        assert abs(r.activated - base) / base < 0.06, (name, r.activated, base)
    # the MoE runs hold several times the dense run's parameters, GShard and DeepSeekMoE about alike
    assert results["GShard"].total > 3 * results["MLA"].total
    assert abs(results["DeepSeekMoE"].total / results["GShard"].total - 1) < 0.06


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
def test_gqa_matches_naive_causal_attention(ablation, n_kv_heads):
    torch.manual_seed(0)
    D, H, d = 32, 4, 8
    m = ablation.GQA(D, H, n_kv_heads, d)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        ours = m(x, None)
    w = [lin.weight.double() for lin in (m.wq, m.wk, m.wv, m.wo)]
    ref = naive_attention(x.double(), *w, H, n_kv_heads, d)  # float64: the reference's own rounding drops out
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_gqa_rejects_groups_that_do_not_divide_the_heads(ablation):
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ablation.GQA(32, 4, 3, 8)
