"""MoE recipe: balance losses, dropping, bias update and statistics against plain-Python hand computations."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from openseek.config import ModelConfig
from openseek.model import Transformer
from openseek.model.moe import MoE, Router
from openseek.train.moe_recipe import MoERecipe, max_violation

B, S, E, K, G, M = 2, 4, 8, 2, 4, 2  # 2 sequences x 4 tokens, 8 experts, top-2, 4 devices, limit 2


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=8, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=2,
                num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1)
    return ModelConfig(**{**base, **kw})


def hand_logits(n_tokens: int, seed: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(rng.uniform(-2, 2), 3) for _ in range(E)] for _ in range(n_tokens)]


def moe_with_logits(cfg: ModelConfig, logits: list[list[float]]) -> tuple[MoE, torch.Tensor]:
    """An MoE whose router logits for token t of the returned input (B, S, N) are exactly logits[t]."""
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.weight.copy_(torch.tensor(logits).T)  # one-hot token t picks column t
    n = len(logits)
    return moe, torch.eye(n).view(B, n // B, n)


def py_scores(logits, sigmoid=False):
    if sigmoid:
        return [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]


def py_topk(row, k=K, keep_groups=G):
    """Top-k among the experts of the keep_groups device groups holding the best single experts (V2)."""
    per = len(row) // G
    groups = sorted(range(G), key=lambda d: -max(row[d * per:(d + 1) * per]))[:keep_groups]
    allowed = [i for i in range(len(row)) if i // per in groups]
    return set(sorted(allowed, key=lambda i: -row[i])[:k])


def py_losses(s, T, k=K, keep_groups=G):
    """The V2 paper's three losses (alpha = 1) per sequence of T tokens, averaged over sequences."""
    per, K = E // G, k
    exp_l, dev_l, comm_l = [], [], []
    for b in range(len(s) // T):
        rows = s[b * T:(b + 1) * T]
        sel = [py_topk(r, K, keep_groups) for r in rows]
        f = [E / (K * T) * sum(i in st for st in sel) for i in range(E)]
        P = [sum(r[i] for r in rows) / T for i in range(E)]
        exp_l.append(sum(f[i] * P[i] for i in range(E)))
        dev_f = [sum(f[d * per:(d + 1) * per]) / per for d in range(G)]
        dev_P = [sum(P[d * per:(d + 1) * per]) for d in range(G)]
        dev_l.append(sum(dev_f[d] * dev_P[d] for d in range(G)))
        comm_f = [G / (M * T) * sum(any(i // per == d for i in st) for st in sel) for d in range(G)]
        comm_l.append(sum(comm_f[d] * dev_P[d] for d in range(G)))
    n = len(exp_l)
    return sum(exp_l) / n, sum(dev_l) / n, sum(comm_l) / n


def test_v2_balance_losses_equal_hand_computation():
    logits = hand_logits(B * S)
    # top-3 over device-limited routing (M = 2 of 4 groups), so K != M and the limit changes selections
    cfg = tiny_cfg(num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=G, topk_group=M)
    moe, x = moe_with_logits(cfg, logits)
    recipe = MoERecipe(alpha1=0.003, alpha2=0.05, alpha3=0.02, n_devices=G, device_limit=M)
    recipe.install(moe)
    moe(x)
    got = recipe.step_losses()
    s = py_scores(logits)
    assert any(py_topk(r, 3, M) != py_topk(r, 3) for r in s)
    e, d, c = py_losses(s, S, k=3, keep_groups=M)
    assert set(got) == {"expert_balance", "device_balance", "comm_balance"}
    assert got["expert_balance"].item() == pytest.approx(0.003 * e, rel=1e-5)
    assert got["device_balance"].item() == pytest.approx(0.05 * d, rel=1e-5)
    assert got["comm_balance"].item() == pytest.approx(0.02 * c, rel=1e-5)
    assert recipe.total_aux().item() == pytest.approx(0.003 * e + 0.05 * d + 0.02 * c, rel=1e-5)


def test_v3_sequence_wise_loss_uses_normalised_sigmoid_scores():
    logits = hand_logits(B * S, seed=1)
    cfg = tiny_cfg(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    moe, x = moe_with_logits(cfg, logits)
    recipe = MoERecipe(seq_aux_alpha=1e-4)
    recipe.install(moe)
    moe(x)
    s = py_scores(logits, sigmoid=True)
    want = 0.0
    for b in range(B):
        rows = s[b * S:(b + 1) * S]
        sel = [py_topk(r) for r in rows]
        f = [E / (K * S) * sum(i in st for st in sel) for i in range(E)]
        P = [sum(r[i] / sum(r) for r in rows) / S for i in range(E)]
        want += sum(f[i] * P[i] for i in range(E)) / B
    got = recipe.step_losses()
    assert set(got) == {"seq_balance"}
    assert got["seq_balance"].item() == pytest.approx(1e-4 * want, rel=1e-5)


def test_losses_backprop_into_router_not_experts():
    moe, x = moe_with_logits(tiny_cfg(), hand_logits(B * S))
    recipe = MoERecipe(alpha1=0.1, alpha2=0.1, alpha3=0.1, n_devices=G, device_limit=M)
    recipe.install(moe)
    moe(x)
    recipe.total_aux().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters())


def test_disabled_losses_are_absent():
    moe, x = moe_with_logits(tiny_cfg(), hand_logits(B * S))
    recipe = MoERecipe()
    recipe.install(moe)
    moe(x)
    assert recipe.step_losses() == {}
    assert recipe.total_aux().item() == 0.0


def test_group_limited_routing_reaches_at_most_m_devices():
    cfg = tiny_cfg(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
                   n_group=G, topk_group=M)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    _, ids, _ = router(torch.randn(512, cfg.hidden_size))
    devices = [{i // (16 // G) for i in row} for row in ids.tolist()]
    assert max(len(d) for d in devices) <= M
    assert any(len(d) == M for d in devices)  # the limit binds, so the check can fail


def run_hook(recipe: MoERecipe, moe: MoE, x: torch.Tensor):
    """The router's output and the gate weights the recipe returns for it."""
    w, ids, s = moe.gate(x.flatten(0, -2))
    return w, ids, s, moe.route_hook(moe, x, s, w, ids)


def test_dropping_keeps_budget_and_drops_lowest_affinity_first():
    nB, nS = 4, 8
    logits = [[v + (0.5 if i < 2 else 0.0) for i, v in enumerate(row)]  # overload device 0 (experts 0, 1)
              for row in hand_logits(nB * nS, seed=2)]
    moe = MoE(tiny_cfg(hidden_size=nB * nS))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor(logits).T)
    x = torch.eye(nB * nS).view(nB, nS, nB * nS)
    recipe = MoERecipe(n_devices=G, device_limit=M, capacity_factor=1.0, drop_exempt_fraction=0.5)
    recipe.install(moe)
    w, ids, s, got = run_hook(recipe, moe, x)
    budget = nB * nS * K // G  # capacity 1.0: the average number of pairs per device
    exempt = {1, 3}  # every second sequence at fraction 0.5
    s, ids = py_scores(logits), ids.tolist()
    dropped_total, partial = 0, False
    for d in range(G):
        pairs = [(s[n][ids[n][k]], n, k) for n in range(nB * nS) for k in range(K) if ids[n][k] // (E // G) == d]
        free = sorted(p for p in pairs if p[1] // nS not in exempt)
        n_drop = min(max(0, len(pairs) - budget), len(free))
        want = {(n, k) for _, n, k in free[:n_drop]}
        have = {(n, k) for _, n, k in pairs if got[n, k] == 0}
        assert have == want, f"device {d}"
        partial |= 0 < n_drop < len(free)  # so which pairs go matters
        assert len(pairs) - len(have) <= max(budget, len(pairs) - len(free))
        dropped_total += n_drop
    assert dropped_total > 0 and partial
    kept = got != 0
    torch.testing.assert_close(got[kept], w[kept])
    assert recipe.stats()[""]["dropped_fraction"] == pytest.approx(dropped_total / (nB * nS * K))


def test_exempt_sequences_are_evenly_spaced():
    recipe = MoERecipe(drop_exempt_fraction=0.1)
    assert recipe._exempt(20, torch.device("cpu")).nonzero().flatten().tolist() == [9, 19]
    assert not MoERecipe(drop_exempt_fraction=0.0)._exempt(8, torch.device("cpu")).any()


def test_eval_mode_never_drops():
    moe, x = moe_with_logits(tiny_cfg(), [[v + (3.0 if i == 0 else 0.0) for i, v in enumerate(r)]
                                          for r in hand_logits(B * S)])
    recipe = MoERecipe(n_devices=G, device_limit=M, capacity_factor=0.25, drop_exempt_fraction=0.0)
    recipe.install(moe)
    assert (run_hook(recipe, moe, x)[3] == 0).any()
    recipe.reset()
    moe.eval()
    w, _, _, got = run_hook(recipe, moe, x)
    torch.testing.assert_close(got, w)
    assert recipe.stats()[""]["dropped_fraction"] == 0.0


def py_loads(logits, sigmoid=False):
    load = [0] * E
    for row in py_scores(logits, sigmoid):
        for i in py_topk(row):
            load[i] += 1
    return load


def test_v3_bias_update_moves_by_exactly_gamma_over_the_whole_step():
    cfg = tiny_cfg(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    first, second = hand_logits(B * S, seed=3), hand_logits(B * S, seed=4)
    moe, x = moe_with_logits(cfg, first)
    recipe = MoERecipe(bias_update_speed=0.001)
    recipe.install(moe)
    moe(x)
    recipe.reset()  # a second micro-batch of the same step
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor(second).T)
    moe(x)
    recipe.update_bias(moe)
    load = [a + b for a, b in zip(py_loads(first, True), py_loads(second, True))]
    mean = sum(load) / E
    want = [-0.001 if v > mean else 0.001 if v < mean else 0.0 for v in load]
    assert any(v < 0 for v in want) and any(v > 0 for v in want)
    torch.testing.assert_close(moe.gate.bias, torch.tensor(want))
    recipe.update_bias(moe)  # loads were consumed: nothing moves
    torch.testing.assert_close(moe.gate.bias, torch.tensor(want))


def test_stats_match_hand_counts():
    logits = [[v + (4.0 if i in (0, 3) else 0.0) - (9.0 if i in (5, 6) else 0.0) for i, v in enumerate(r)]
              for r in hand_logits(B * S, seed=5)]
    moe, x = moe_with_logits(tiny_cfg(), logits)
    recipe = MoERecipe()
    recipe.install(moe)
    moe(x)
    load = py_loads(logits)
    mean = sum(load) / E
    std = math.sqrt(sum((v - mean) ** 2 for v in load) / E)
    st = recipe.stats()[""]
    assert st["dead_experts"] == sum(v == 0 for v in load) >= 2
    assert st["load_cv"] == pytest.approx(std / mean)
    assert st["load_max_over_mean"] == pytest.approx(max(load) / mean)
    assert st["dropped_fraction"] == 0.0


def test_max_violation_is_max_over_mean_minus_one():
    loads = torch.tensor([[3, 1, 0, 4], [2, 2, 2, 2], [0, 0, 0, 0]])  # means 2, 2, 0
    torch.testing.assert_close(max_violation(loads), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_maxvio_per_batch_and_per_sequence_over_two_forwards_match_hand_counts():
    first, second = hand_logits(B * S, seed=6), hand_logits(B * S, seed=7)
    moe, x = moe_with_logits(tiny_cfg(), first)
    recipe = MoERecipe()
    recipe.install(moe)
    moe(x)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor(second).T)
    moe(x)  # no reset(): the second forward's sequences join the first's
    seqs = [rows[b * S:(b + 1) * S] for rows in (first, second) for b in range(B)]
    loads = [py_loads(rows) for rows in seqs]
    batch = [sum(col) for col in zip(*loads)]
    vio = [max(v) / (sum(v) / E) - 1 for v in loads]
    st = recipe.stats()[""]
    assert st["maxvio_batch"] == pytest.approx(max(batch) / (sum(batch) / E) - 1)
    assert st["maxvio_seq"] == pytest.approx(sum(vio) / len(vio))
    assert st["maxvio_seq"] > st["maxvio_batch"] > 0  # a sequence of S tokens is lumpier than the whole batch


def test_install_on_transformer_sums_layers_and_remove_detaches():
    cfg = tiny_cfg(num_hidden_layers=3, first_k_dense_replace=1, hidden_size=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.3)
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    assert len(moes) == 2
    seen = {}
    for n, m in moes.items():
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0].detach()))
    recipe = MoERecipe(alpha1=0.01, n_devices=G, device_limit=M)
    recipe.install(model)
    recipe.reset()
    model(torch.randint(0, 32, (B, S)))
    want = 0.0
    for n, m in moes.items():
        scores = m.gate(seen[n].flatten(0, -2))[2].tolist()
        want += 0.01 * py_losses(scores, S)[0]
    assert recipe.step_losses()["expert_balance"].item() == pytest.approx(want, rel=1e-5)
    assert set(recipe.stats()) == set(moes)
    recipe.remove(model)
    assert all(m.route_hook is None for m in moes.values())
    recipe.reset()
    model(torch.randint(0, 32, (B, S)))
    assert recipe.step_losses() == {} and recipe.stats() == {}


@pytest.mark.parametrize("kw, field", [
    (dict(n_devices=2, device_limit=3), "device_limit"),
    (dict(alpha1=-1.0), "alpha1"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(drop_exempt_fraction=1.5), "drop_exempt_fraction"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoERecipe(**kw)


def test_install_rejects_devices_not_dividing_experts_and_bias_without_router_bias():
    moe = MoE(tiny_cfg())
    with pytest.raises(ValueError, match="n_devices"):
        MoERecipe(n_devices=3, device_limit=1).install(moe)
    with pytest.raises(ValueError, match="bias_update_speed"):
        MoERecipe(bias_update_speed=0.001).install(moe)
    assert moe.route_hook is None


def naive_device_limited_ids(choice: list[list[float]], K: int, G: int, limit: int, per_group: int) -> list[set]:
    """Per token: score each device by the sum of its top per_group choice scores, keep the best `limit` devices,
    then the top K experts among theirs."""
    out = []
    for row in choice:
        size = len(row) // G
        score = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:per_group]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -score[g])[:limit]
        experts = [e for g in kept for e in range(g * size, (g + 1) * size)]
        out.append(set(sorted(experts, key=lambda e: -row[e])[:K]))
    return out


@pytest.mark.parametrize("router_kw, limit, per_group", [
    (dict(), 2, 1),  # V2 softmax greedy: a device scores its best expert
    (dict(scoring_func="sigmoid", topk_method="noaux_tc"), 1, 4),  # V3: its top K/limit biased scores
])
def test_recipe_limits_routing_to_device_limit_devices_and_remove_lifts_it(router_kw, limit, per_group):
    nE, nK, nG = 16, 4, 4
    moe = MoE(tiny_cfg(n_routed_experts=nE, num_experts_per_tok=nK, **router_kw))
    torch.manual_seed(0)
    torch.nn.init.normal_(moe.gate.weight)
    if moe.gate.bias is not None:
        moe.gate.bias.normal_(0, 0.5)
    x = torch.randn(256, 8)
    devices = lambda ids: [{i // (nE // nG) for i in row} for row in ids.tolist()]  # noqa: E731
    free = devices(moe.gate(x)[1])
    assert max(len(d) for d in free) > limit  # unlimited routing crosses the limit, so the check can fail
    recipe = MoERecipe(n_devices=nG, device_limit=limit)
    recipe.install(moe)
    _, ids, scores = moe.gate(x)
    choice = scores + (moe.gate.bias if moe.gate.bias is not None else 0)
    assert [set(r) for r in ids.tolist()] == naive_device_limited_ids(choice.tolist(), nK, nG, limit, per_group)
    assert max(len(d) for d in devices(ids)) <= limit
    recipe.remove(moe)
    assert devices(moe.gate(x)[1]) == free


def test_install_rejects_a_device_limit_holding_fewer_than_k_experts():
    moe = MoE(tiny_cfg(num_experts_per_tok=4))  # 8 experts on 4 devices: 2 per device
    with pytest.raises(ValueError, match="device_limit=1 is invalid") as e:
        MoERecipe(n_devices=4, device_limit=1).install(moe)
    assert e.value.field == "device_limit"




@pytest.mark.parametrize("G, limit, K, message", [
    (4, 2, 2, "device_limit=2 >= num_experts_per_tok=2: .* never binds"),  # the old `small` preset
    (2, 2, 3, "device_limit=2 = n_devices=2 keeps every device group"),
])
def test_install_warns_when_the_device_limit_cannot_bind(G, limit, K, message, caplog):
    moe = MoE(tiny_cfg(num_experts_per_tok=K))
    with caplog.at_level("WARNING", logger="openseek.train.moe_recipe"):
        MoERecipe(n_devices=G, device_limit=limit).install(moe)
    assert len(caplog.records) == 1 and re.search(message, caplog.text), caplog.text


def test_install_is_silent_when_the_limit_binds_or_none_is_asked(caplog):
    with caplog.at_level("WARNING", logger="openseek.train.moe_recipe"):
        MoERecipe().install(MoE(tiny_cfg()))
        MoERecipe(n_devices=4, device_limit=1).install(MoE(tiny_cfg()))
    assert not caplog.records
