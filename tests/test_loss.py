"""The head fused with cross-entropy (train/loss.py) against F.cross_entropy on materialised logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import openseek
from openseek.train.config import train_preset
from openseek.train.step import init_weights, lm_loss
from openseek.train.loss import IGNORE_INDEX, linear_cross_entropy


def _case(n: int = 50, d: int = 16, v: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("d, v", [(16, 37), (40, 37)], ids=["three_chunks", "one_chunk"])
def test_matches_cross_entropy_and_its_gradients(d, v):
    h, w, t = _case(d=d, v=v)  # ceil(v / d) chunks of 50 tokens: 17, 17 and 16, or one
    got = linear_cross_entropy(h, w, t)
    want = F.cross_entropy(h @ w.T, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(3.0 * got, (h, w)), torch.autograd.grad(3.0 * want, (h, w))):
        torch.testing.assert_close(a, b)  # the upstream gradient (3.0) scales both


def test_without_grad_gives_the_same_value():
    h, w, t = _case()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t))


def test_all_targets_ignored_is_nan_as_in_cross_entropy():
    h, w, t = _case()
    t[:] = IGNORE_INDEX
    assert math.isnan(linear_cross_entropy(h, w, t).item()) and math.isnan(F.cross_entropy(h @ w.T, t).item())


def test_bfloat16_autocast_matches_the_unfused_autocast_path():
    h, w, t = _case(n=64, d=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t)
        logits = h @ w.T
    assert logits.dtype == torch.bfloat16  # the reference really ran in bf16
    want = F.cross_entropy(logits.float(), t)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    grads = torch.autograd.grad(got, (h, w))
    for a, b in zip(grads, torch.autograd.grad(want, (h, w))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0.02)


def test_bfloat16_training_step_tracks_float32():
    """A whole model's loss and gradients under bf16 autocast (padded experts, fused head) stay near float32's."""
    cfg = train_preset("tiny")
    model = openseek.Transformer(cfg.model_config())
    init_weights(model, 0.02, 0)
    x = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        loss = lm_loss(model, x[:, :-1], x[:, 1:], dtype)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # near-uniform at init: a real loss
    assert losses[1] == pytest.approx(losses[0], abs=5e-3)
    cos = F.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos
