"""MLA's absorbed path (W_UK folded into the query, W_UV after the output) against the expanded one, and the
absorbed weights' life cycle: built by Transformer.absorb_weights(), renewed by calling it again."""

from __future__ import annotations

import pytest
import torch

from openseek.config import ModelConfig
from openseek.model import Transformer


@pytest.fixture
def model():
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                      q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                      n_routed_experts=None, rope_scaling=None)
    torch.manual_seed(0)
    m = Transformer(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def both_paths(attn, seed: int = 0):
    """Causal attention of 5 queries over 7 latents (the queries are the last 5): expanded, absorbed."""
    g = torch.Generator().manual_seed(seed)
    H, Q, R, C = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.kv_lora_rank
    q_nope, q_pe = torch.randn(2, 5, H, Q, generator=g), torch.randn(2, 5, H, R, generator=g)
    latents = torch.randn(2, 7, C + R, generator=g)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(2)  # (S, T)
    with torch.no_grad():
        expanded = attn.attend_expanded(q_nope, q_pe, *latents.split([C, R], dim=-1), mask)
        absorbed = attn.attend_absorbed(q_nope, q_pe, latents, mask[None].expand(2, -1, -1))
    return expanded, absorbed


def test_absorbed_path_equals_expanded_and_its_weights_are_wkv_b_per_head(model):
    model.absorb_weights()
    attn = model.layers[0].attn
    H, Q, U, C = attn.n_heads, attn.nope_dim, attn.v_dim, attn.kv_lora_rank
    w = attn.wkv_b.weight.view(H, Q + U, C)  # rows of head h: its Q key rows, then its U value rows
    # stored with the summed dim last (W_UK^T, W_UV), so each one-row product reads rows contiguously
    assert attn.w_uk.transpose(1, 2).is_contiguous() and attn.w_uv_t.transpose(1, 2).is_contiguous()
    assert torch.equal(attn.w_uk, w[:, :Q]) and torch.equal(attn.w_uv_t, w[:, Q:].transpose(1, 2))
    expanded, absorbed = both_paths(attn)
    assert absorbed.shape == (2, 5, H, U)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_absorb_again_after_an_in_place_weight_change(model):
    """An optimizer step changes wkv_b in place; the absorbed weights follow only when absorb_weights() is called."""
    model.absorb_weights()
    attn = model.layers[1].attn
    with torch.no_grad():
        attn.wkv_b.weight.mul_(-1.5)
    expanded, absorbed = both_paths(attn)
    assert not torch.allclose(absorbed, expanded, atol=1e-3)  # stale until renewed: built once, not tracked
    model.absorb_weights()
    expanded, absorbed = both_paths(attn)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_absorbed_path_without_absorb_weights_says_what_to_call(model):
    with pytest.raises(RuntimeError, match=r"Transformer\.absorb_weights\(\)"):
        both_paths(model.layers[0].attn)


def test_absorbed_weights_are_buffers_that_move_and_are_not_saved(model):
    model.absorb_weights()
    assert not any("w_uk" in k or "w_uv_t" in k for k in model.state_dict())
    model.to(torch.bfloat16)
    assert model.layers[0].attn.w_uk.dtype == model.layers[0].attn.w_uv_t.dtype == torch.bfloat16
