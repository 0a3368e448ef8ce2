"""Sampler: each test checks against hand-computed values, a naive loop written here, or draw statistics."""

from __future__ import annotations

import math
import re

import pytest
import torch

from openseek.engine.sampler import SampleResult, SamplingParams, TokenMasks, _inverse_cdf, sample

INF, NAN = math.inf, math.nan


def run(logits, params, generators=None, prompt_ids=None, output_ids=None, eos=None, masks=None) -> SampleResult:
    B = logits.shape[0]
    generators = generators or [torch.Generator().manual_seed(i) for i in range(B)]
    return sample(logits, params, generators, prompt_ids or [[] for _ in range(B)],
                  output_ids or [[] for _ in range(B)], eos, masks)


def draws(logits_row, params, n=500, seed=0) -> list[int]:
    """n successive draws for one row, all from the same generator."""
    g = torch.Generator().manual_seed(seed)
    return [run(logits_row[None], [params], [g]).token_ids[0] for _ in range(n)]


def naive_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


# --- SamplingParams --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 0.5), ("max_tokens", 0),
    ("max_tokens", 1.5), ("n", 0), ("logprobs", 21), ("logprobs", -1), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("min_tokens", -1), ("temperature", float("nan")),
    ("stop", [""]), ("stop", [1]), ("stop_token_ids", [-1]), ("seed", 1.0), ("n", True), ("ignore_eos", 1),
    ("temperature", float("inf")), ("temperature", 1e39), ("repetition_penalty", 1e-45), ("repetition_penalty", 1e-3),
    ("repetition_penalty", 101.0), ("top_p", float("nan")), ("min_p", float("inf")),
    ("logit_bias", {1: 100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {1: float("nan")}), ("logit_bias", {"1": 1}),
    ("logit_bias", {i: 1.0 for i in range(301)}), ("logit_bias", [1]), ("structured_outputs", {"json": {}}),
])
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r} is invalid: must be")):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"^min_tokens=5 is invalid: must be <= max_tokens=3"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_params_normalise_stop_and_report_greedy():
    p = SamplingParams(stop="\n\n", temperature=0, top_k=-1, max_tokens=None)
    assert p.stop == ["\n\n"] and p.stop_token_ids == [] and p.greedy
    q = SamplingParams(stop=("a", "b"), stop_token_ids=(7,))
    assert q.stop == ["a", "b"] and q.stop_token_ids == [7] and not q.greedy


# --- greedy and truncation ---------------------------------------------------------------------------------------

def test_greedy_takes_the_first_max():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[5, [3, 17, 40]] = 9.0  # a tie: the lowest id wins
    out = run(logits, [SamplingParams(temperature=0)] * 6)
    expected = [max(range(50), key=lambda j: (row[j], -j)) for row in logits.tolist()]
    assert out.token_ids == expected and expected[5] == 3
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_1_and_tiny_top_p_equal_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 1000) * 2
    best = [max(range(1000), key=row.__getitem__) for row in logits.tolist()]
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(top_p=1e-6, temperature=5.0)):
        assert run(logits, [p] * 8).token_ids == best


def test_top_k_restricts_draws_to_the_k_best():
    torch.manual_seed(2)
    logits = torch.randn(40) * 0.3
    best5 = set(sorted(range(40), key=lambda j: -logits[j].item())[:5])
    assert set(draws(logits, SamplingParams(top_k=5))) == best5


def test_top_p_support_is_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    order = sorted(range(6), key=lambda j: -probs[j].item())
    for top_p, size in ((0.5, 2), (0.55, 2), (0.56, 3), (0.9, 5), (1.0, 6)):
        kept, mass = set(), 0.0
        for j in order:  # naive nucleus: add tokens, most likely first, until the mass reaches top_p
            if mass >= top_p:
                break
            kept.add(j)
            mass += probs[j].item()
        assert len(kept) == size
        assert set(draws(probs.log(), SamplingParams(top_p=top_p), n=400)) == kept


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top-k {0, 1} renormalised is [0.571, 0.429]: 0.571 >= 0.55 keeps token 0 only (on the raw distribution
    # 0.4 < 0.55 would keep both)
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    assert set(draws(logits, SamplingParams(top_k=2, top_p=0.55), n=200)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.09, 0.06, 0.05])
    for min_p, kept in ((0.2, {0, 1, 2, 3}), (0.5, {0, 1}), (0.0, set(range(6)))):
        assert {j for j in range(6) if probs[j] >= min_p * probs.max()} == kept  # the rule, by hand
        assert set(draws(probs.log(), SamplingParams(min_p=min_p), n=600)) == kept


@pytest.mark.parametrize("params, keep", [(SamplingParams(), [0, 1, 2, 3]),
                                          (SamplingParams(temperature=2.0), [0, 1, 2, 3]),
                                          (SamplingParams(top_k=3), [0, 1, 3])])
@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [5, 300, 400, 999]], ids=["vocab4", "spread-over-1000"])
def test_empirical_distribution_matches_softmax(params, keep, ids):
    values, n = [1.0, 0.5, -0.5, 0.0], 4000
    logits = torch.full((max(ids) + 1,), -math.inf)
    logits[ids] = torch.tensor(values)
    tokens = run(logits.expand(n, -1), [params] * n).token_ids
    scaled = [values[j] / params.temperature for j in keep]
    z = sum(math.exp(x) for x in scaled)
    expected = {ids[j]: n * math.exp(x) / z for j, x in zip(keep, scaled)}
    assert set(tokens) <= set(expected)
    chi2 = sum((tokens.count(t) - e) ** 2 / e for t, e in expected.items())
    assert chi2 < 16.3, (tokens, expected)  # p = 0.001 at 3 degrees of freedom


def test_extreme_logits_and_tiny_temperature_stay_finite():
    logits = torch.tensor([[0.0, 500.0, -500.0, float("-inf"), 499.0]] * 3)
    out = run(logits, [SamplingParams(temperature=1e-30), SamplingParams(temperature=1.0),
                       SamplingParams(temperature=300.0, top_p=0.99)])
    assert out.token_ids[0] == 1 and out.token_ids[1] in (1, 4)  # only 500 and 499 carry mass at T=1
    assert out.token_ids[2] in (0, 1, 2, 4)  # -inf never, whatever the temperature


def test_temperature_below_1e_5_is_greedy_and_a_huge_one_draws_nearly_uniformly():
    # 1e-46 is 0 in float32: dividing by it made NaN weights, and the draw indexed past the vocabulary
    torch.manual_seed(5)
    logits = torch.randn(4, 300) * 3
    best = logits.argmax(dim=-1).tolist()
    for t in (1e-46, 1e-30, 9e-6):
        assert SamplingParams(temperature=t).greedy
        assert run(logits, [SamplingParams(temperature=t, top_p=0.5)] * 4).token_ids == best
    assert not SamplingParams(temperature=1e-5).greedy
    flat = run(logits[:1].expand(3000, -1), [SamplingParams(temperature=1e30)] * 3000).token_ids
    assert len(set(flat)) > 270  # 3000 uniform draws over 300 tokens miss about 0.01 of them
    assert run(logits, [SamplingParams(temperature=3e38)] * 4).token_ids  # float32's largest still draws


def test_tiny_and_huge_repetition_penalties_stay_finite():
    logits = torch.tensor([[3e37, 1.0, -3e37, 2.0]])
    for penalty in (0.01, 100.0):  # 0.01 makes token 0's logit +inf (inf - inf was NaN); 100 makes token 2's -inf
        params = SamplingParams(temperature=0, repetition_penalty=penalty, logprobs=2)
        out = run(logits, [params], prompt_ids=[[0, 2]])
        assert out.token_ids == [0] and out.logprobs == [0.0] and out.failed == []
        drawn = run(logits, [SamplingParams(repetition_penalty=penalty)], prompt_ids=[[0, 2]])
        assert drawn.token_ids == [0] and drawn.failed == []


def test_non_finite_rows_do_not_change_the_other_rows():
    torch.manual_seed(6)
    V = 600
    healthy = torch.randn(3, V) * 2
    sick = torch.randn(5, V)
    sick[0] = NAN  # a forward pass that went NaN
    sick[1, [10, 400]] = INF  # +inf: those tokens share the row's mass
    sick[2] = -INF  # nothing can be drawn
    sick[3, ::2] = NAN  # NaN logits are never drawn
    sick[4, 7] = INF
    sick[4, 8] = NAN
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=1), SamplingParams(temperature=0, logprobs=2),
              SamplingParams(top_k=20, repetition_penalty=1.2, seed=2)]
    for p in params:
        alone = [run(healthy[i:i + 1], [p], [torch.Generator().manual_seed(i)], [[1, 2]]).token_ids[0]
                 for i in range(3)]
        mixed = torch.cat([healthy[:1], sick[:3], healthy[1:2], sick[3:], healthy[2:]])  # healthy at rows 0, 4, 7
        gens = [torch.Generator().manual_seed(i) for i in (0, 9, 9, 9, 1, 9, 9, 2)]
        out = run(mixed, [p] * 8, gens, [[1, 2]] * 8)
        assert [out.token_ids[i] for i in (0, 4, 7)] == alone
        assert out.failed == [1, 3]  # the all-NaN and the all--inf rows
        assert out.token_ids[2] in (10, 400) and out.token_ids[5] % 2 == 1 and out.token_ids[6] == 7
        assert all(0 <= t < V for t in out.token_ids)


def test_inverse_cdf_stays_in_range_on_rows_without_finite_mass():
    w = torch.tensor([[NAN] * 300, [0.0] * 300, [INF] + [1.0] * 299, [1.0] * 300])  # 300: a partial last block
    u = torch.full((4,), 0.999, dtype=torch.float64)
    assert all(0 <= t < 300 for t in _inverse_cdf(w, u).tolist())


def test_inverse_cdf_never_lands_on_a_token_without_mass():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    top = torch.full((3,), 1 - 2.0**-53, dtype=torch.float64)
    assert _inverse_cdf(w, top).tolist() == [1, 3, 3]
    assert _inverse_cdf(w, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 1, 3]
    assert _inverse_cdf(w, torch.tensor([0.49, 0.67, 0.5], dtype=torch.float64)).tolist() == [0, 3, 3]


# --- determinism -------------------------------------------------------------------------------------------------

def test_seeded_row_gives_the_same_tokens_whatever_shares_the_batch():
    torch.manual_seed(3)
    steps = [torch.randn(5, 3000) * 2 for _ in range(12)]
    mine = SamplingParams(top_p=0.8, temperature=0.9, seed=1234)
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5, presence_penalty=1.0),
              SamplingParams(min_p=0.1, repetition_penalty=1.3, logprobs=3), SamplingParams(temperature=1.5)]
    alone_g, batch_g = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    other_g = [torch.Generator().manual_seed(i) for i in range(4)]
    alone, batched = [], []
    for logits in steps:
        alone.append(run(logits[2:3], [mine], [alone_g], [[1, 2]], [alone[:]]).token_ids[0])
        params = others[:2] + [mine] + others[2:]
        gens = other_g[:2] + [batch_g] + other_g[2:]
        out = run(logits, params, gens, [[1, 2]] * 5, [batched[:]] * 5)
        batched.append(out.token_ids[2])
    assert alone == batched
    assert len(set(alone)) > 1  # the row really sampled


# --- penalties, min_tokens, logprobs -----------------------------------------------------------------------------

def test_penalties_match_a_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.2]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logprobs=6)
    before = logits.clone()
    out = run(logits, [params], prompt_ids=[[0, 1, 0]], output_ids=[[3, 3, 4]])
    # repetition on {0, 1, 3, 4}: 2 -> 1, -1 -> -2, 3 -> 1.5, -2 -> -4; then token 3 (twice): 1.5 - 2*0.5 - 0.25,
    # token 4 (once): -4 - 0.5 - 0.25
    penalised = [1.0, -2.0, 0.5, 0.25, -4.75, 1.2]
    assert out.token_ids == [5]  # was 3 before the penalties
    expected = sorted(enumerate(naive_log_softmax(penalised)), key=lambda t: -t[1])
    assert [t for t, _ in out.top_logprobs[0]] == [t for t, _ in expected]
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx([lp for _, lp in expected], abs=1e-5)
    assert torch.equal(logits, before)  # the caller's logits are untouched


def test_negative_penalties_reward_repeats():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=-0.2)
    assert run(logits, [params], output_ids=[[1]]).token_ids == [1]  # 0.9 + 0.2 beats 1.0


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 3.0, 8.0]])  # eos = 3, stop id 5
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5, 99])  # 99 lies outside the vocabulary
    assert run(logits, [p], output_ids=[[1]], eos=3).token_ids == [4]
    assert run(logits, [p], output_ids=[[1, 1]], eos=3).token_ids == [3]
    ignore = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    assert run(logits, [ignore], output_ids=[[1]], eos=3).token_ids == [3]  # eos does not end it: not masked
    sampled = SamplingParams(min_tokens=1, stop_token_ids=[5])
    g = torch.Generator().manual_seed(0)
    seen = {run(logits, [sampled], [g], eos=3).token_ids[0] for _ in range(300)}
    assert 3 not in seen and 5 not in seen and 4 in seen


def test_logprobs_are_log_softmax_before_temperature_with_sorted_top_n():
    torch.manual_seed(4)
    logits = torch.randn(3, 30) * 2
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=4), SamplingParams(), SamplingParams(logprobs=0)]
    out = run(logits, params)
    for i, row in enumerate(logits.tolist()):
        ref = naive_log_softmax(row)
        assert out.logprobs[i] == pytest.approx(ref[out.token_ids[i]], abs=1e-5)
    expected = sorted(enumerate(naive_log_softmax(logits[0].tolist())), key=lambda t: -t[1])[:4]
    assert [t for t, _ in out.top_logprobs[0]] == [t for t, _ in expected]
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx([lp for _, lp in expected], abs=1e-5)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_batch_shape_mismatches_are_rejected():
    with pytest.raises(ValueError, match="generators has 1 entries"):
        sample(torch.zeros(2, 5), [SamplingParams()] * 2, [torch.Generator()], [[], []], [[], []], None)
    with pytest.raises(ValueError, match="token ids must be in"):
        run(torch.zeros(1, 5), [SamplingParams(repetition_penalty=1.2)], prompt_ids=[[7]])


# --- logit_bias and grammar masks ------------------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens_and_logprobs_include_it():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    forced = run(logits, [SamplingParams(temperature=0, logit_bias={1: 100.0}, logprobs=4)])
    assert forced.token_ids == [1]
    biased = [2.0, 99.0, 0.5, 3.0]  # -1 + 100
    expected = sorted(enumerate(naive_log_softmax(biased)), key=lambda t: -t[1])
    assert forced.top_logprobs[0] == pytest.approx(expected, abs=1e-5)
    banned = run(logits, [SamplingParams(temperature=0, logit_bias={3: -100.0, 0: -1.6})])
    assert banned.token_ids == [2]  # 3 -> -97, 0 -> 0.4: token 2's 0.5 is now the best
    g = torch.Generator().manual_seed(0)
    seen = {run(logits, [SamplingParams(logit_bias={3: -100.0})], [g]).token_ids[0] for _ in range(300)}
    assert 3 not in seen and seen == {0, 1, 2}


def test_logit_bias_comes_before_the_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # bias first (vLLM's order): token 0 is (2 - 1.5) / 2 = 0.25; the penalty first would give 2 / 2 - 1.5 = -0.5
    out = run(logits, [SamplingParams(temperature=0, logit_bias={0: -1.5}, repetition_penalty=2.0, logprobs=0)],
              output_ids=[[0]])
    assert out.token_ids == [1]
    assert out.logprobs == pytest.approx([naive_log_softmax([0.25, 1.0, 0.0])[1]], abs=1e-6)


def test_grammar_mask_applies_to_its_rows_only_and_beats_bias():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0], [3.0, 1.0, 0.0, 0.5]])
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0, logit_bias={1: 100.0}),
              SamplingParams(temperature=0, logprobs=0)]
    masks = TokenMasks([0, 1], torch.tensor([[True, False, True, False], [True, False, False, True]]))
    out = run(logits, params, masks=masks)
    assert out.token_ids == [2, 3, 0]  # the bias cannot bring back a masked token
    assert out.logprobs[0] == pytest.approx(naive_log_softmax([0.0, 1.0])[1], abs=1e-6)
    alone = run(logits[2:], params[2:])
    assert out.logprobs[2] == alone.logprobs[0]  # the unconstrained row is untouched
    g = torch.Generator().manual_seed(0)
    draws_ = {run(logits[:1], [SamplingParams()], [g], masks=TokenMasks([0], masks.allowed[:1])).token_ids[0]
              for _ in range(200)}
    assert draws_ == {0, 2}
