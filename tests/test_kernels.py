"""The kernel set a forward runs is the one its entry point is given: the paged forward INFERENCE's by default, the
dense forward TRAINING's, on one model at once, with no state left behind."""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from openseek.config import ModelConfig
from openseek.model import Transformer
from openseek.model.batch import ForwardBatch
from openseek.model.ops import INFERENCE, REFERENCE, Kernels


def counting(kernels: Kernels, calls: Counter) -> Kernels:
    """kernels with every call counted by field name."""
    def wrap(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted
    return Kernels(**{f.name: wrap(f.name, fn) if (fn := getattr(kernels, f.name)) is not None else None
                      for f in dataclasses.fields(Kernels)})


def test_each_forward_runs_exactly_the_kernels_it_is_given():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, rope_scaling=None)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.absorb_weights()
    ids = torch.randint(0, 64, (6,))
    calls: Counter = Counter()
    batch = ForwardBatch(positions=torch.arange(6), slot_mapping=torch.arange(6), block_tables=torch.tensor([[0, 1]]),
                         context_lens=[6], query_lens=[6], num_decodes=0, block_size=4)
    cache = torch.zeros(2, 8, cfg.kv_cache_dim)  # (layers, slots, C + R)
    with torch.inference_mode():
        paged = model.hidden_states_paged(ids, batch, cache, counting(REFERENCE, calls))  # (N, D)
    L = cfg.num_hidden_layers
    # per layer: wq_a, wq_b, wkv_a, wkv_b, wo, and the dense layer's FFN (3); norms: 2 + q_norm + kv_norm per layer
    assert calls == Counter(linear=5 * L + 3 + 3, rms_norm=4 * L + 1, attention=L, routed_experts=1)
    dense = model.hidden_states(ids[None])[0]  # TRAINING's kernels, with autograd, on the same parameters
    assert sum(calls.values()) == 5 * L + 6 + 4 * L + 1 + L + 1  # none of the dense forward's calls came here
    torch.testing.assert_close(paged, dense.detach(), atol=1e-5, rtol=1e-5)
    dense.square().sum().backward()
    assert model.layers[1].ffn.experts.w1.grad.abs().sum() > 0
    with torch.inference_mode():
        inference = model.hidden_states_paged(ids, batch, cache, INFERENCE)
    torch.testing.assert_close(inference, paged, atol=1e-5, rtol=1e-5)
    calls.clear()
    with torch.no_grad():  # scoring without autograd: the dense forward on the inference kernels
        scored = model.hidden_states(ids[None], kernels=counting(INFERENCE, calls))[0]
    assert calls == Counter(linear=5 * L + 3 + 3, rms_norm=4 * L + 1, attention=L, routed_experts=1)
    torch.testing.assert_close(scored, paged, atol=1e-5, rtol=1e-5)
