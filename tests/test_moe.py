"""Router rules against hand computations; each kernel set's routed experts against a naive per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openseek.config import ModelConfig
from openseek.model.moe import MoE, Router
from openseek.model.ops import INFERENCE, REFERENCE, TRAINING


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden_size=8, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=2,
                num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    return ModelConfig(**{**base, **kw})


def router_with_logits(cfg: ModelConfig, logits: list[float]) -> tuple[Router, torch.Tensor]:
    """A router whose logits for input e_0 are exactly `logits`."""
    r = Router(cfg)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    return r, x


def test_v2_softmax_topk_unnormalised_times_scaling():
    r, x = router_with_logits(tiny_cfg(routed_scaling_factor=16.0), [0.0, 1.0, 2.0, 0.5])
    w, ids, _ = r(x)
    p = torch.tensor([0.0, 1.0, 2.0, 0.5]).exp()
    p = p / p.sum()
    assert sorted(ids[0].tolist()) == [1, 2]
    torch.testing.assert_close(w[0].sort().values, (16 * p[[1, 2]]).sort().values)


def test_v2_norm_topk_prob_renormalises_instead_of_scaling():
    r, x = router_with_logits(tiny_cfg(routed_scaling_factor=16.0, norm_topk_prob=True), [0.0, 1.0, 2.0, 0.5])
    w, _, _ = r(x)
    e1, e2 = torch.tensor(1.0).exp(), torch.tensor(2.0).exp()
    torch.testing.assert_close(w[0].sort().values, torch.stack([e1, e2]).sort().values / (e1 + e2))


def test_group_limited_greedy_stays_in_best_groups():
    # groups {0,1} and {2,3}; group 0's best expert (0) beats group 1's best, so experts 2/3 are excluded
    cfg = tiny_cfg(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    r, x = router_with_logits(cfg, [3.0, -5.0, 2.9, 2.8])
    _, ids, _ = r(x)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_noaux_tc_selects_by_biased_score_weights_by_unbiased():
    cfg = tiny_cfg(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1,
                   norm_topk_prob=True, routed_scaling_factor=2.5)
    r, x = router_with_logits(cfg, [1.0, 0.0, 0.5, 0.4])
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.5]))  # lifts group {2, 3} above group {0, 1}
    w, ids, _ = r(x)
    assert sorted(ids[0].tolist()) == [2, 3]
    s = torch.tensor([0.5, 0.4]).sigmoid()
    torch.testing.assert_close(w[0].sort().values, (2.5 * s / s.sum()).sort().values)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token, one selected expert at a time."""
    w, ids, _ = moe.gate(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[n, k]
            h = F.silu(x[n] @ moe.experts.w1[e].T) * (x[n] @ moe.experts.w3[e].T)
            out[n] += w[n, k] * (h @ moe.experts.w2[e].T)
    return out + moe.shared(x)


@pytest.mark.parametrize("tokens, kernels", [(37, INFERENCE), (1, INFERENCE), (3, INFERENCE), (37, TRAINING),
                                             (300, TRAINING), (37, REFERENCE)],
                         ids=["grouped_gemm", "one_token_decode", "looped_few_tokens", "padded_for_autograd",
                              "padded_groups_over_pad_to", "reference"])
def test_stacked_dispatch_matches_naive_loop(tokens, kernels):
    cfg = tiny_cfg(n_routed_experts=16, num_experts_per_tok=3, hidden_size=16, moe_intermediate_size=8)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grad = kernels is not INFERENCE
    x = torch.randn(tokens, 16, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got = moe(x, kernels)
    with torch.set_grad_enabled(grad):
        want = naive_moe(moe, x)
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    if grad:  # gradients of every parameter and of the input, against the naive loop's
        upstream = torch.randn_like(got)
        params = [x, *moe.parameters()]
        for g_got, g_want in zip(torch.autograd.grad(got, params, upstream),
                                 torch.autograd.grad(want, params, upstream)):
            torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_padded_experts_on_no_pairs_return_zero_rows_that_backpropagate_to_the_input():
    # a rank that receives no pairs under expert parallelism must still join backward through its input
    torch.manual_seed(0)
    w1, w2, w3 = torch.randn(4, 6, 8), torch.randn(4, 8, 6), torch.randn(4, 6, 8)
    x = torch.randn(0, 8, requires_grad=True)
    y = TRAINING.routed_experts(w1, w2, w3, x, torch.ones(0, 1), torch.zeros(0, 1, dtype=torch.long))
    assert y.shape == (0, 8)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == (0, 8)
