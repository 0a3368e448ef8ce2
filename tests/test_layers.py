"""ops.py's fast paths against their references: RMSNorm's hand-written backward against autograd through the plain
formula, the one-row mv against F.linear, padded SDPA against attention written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openseek.model import ops
from openseek.model.layers import Linear, RMSNorm
from openseek.model.ops import INFERENCE, TRAINING


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_and_gradients_match_autograd_of_the_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(24))
    x = (3 * torch.randn(2, 5, 24)).to(dtype).requires_grad_()
    upstream = torch.randn(2, 5, 24)

    def formula(x: torch.Tensor) -> torch.Tensor:  # the reference's RMSNorm, step by step
        xf = x.float()
        return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    got = norm(x, TRAINING)
    want = formula(x)
    with torch.no_grad():  # the inference kernel (F.rms_norm) agrees too
        torch.testing.assert_close(norm(x, INFERENCE), want)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, norm.weight), upstream),
                    torch.autograd.grad(want, (x, norm.weight), upstream)):
        assert a.dtype == b.dtype
        # in bf16 the formula's autograd also rounds the gradient at the cast back to bf16; this does not
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_rmsnorm_emits_the_autocast_dtype_in_training():
    """Under autocast a norm's output only feeds matmuls, so it is cast once there: the formula, rounded."""
    torch.manual_seed(0)
    norm = RMSNorm(24)
    x = torch.randn(3, 24, requires_grad=True)
    with torch.no_grad():
        want = norm(x, INFERENCE).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm(x, TRAINING)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_linear_matches_f_linear(dtype, rows):
    """One bf16 row takes torch.mv (faster than oneDNN's GEMM at M=1 on CPU); the result is F.linear's."""
    torch.manual_seed(0)
    lin = Linear(64, 48).to(dtype)
    x = torch.randn(1, rows, 64, dtype=dtype)
    got, want = lin(x, INFERENCE), F.linear(x, lin.weight)
    assert got.shape == want.shape == (1, rows, 48) and got.dtype == dtype
    tol = 0 if dtype == torch.float32 else 2e-2  # mv and the GEMM may round the bf16 sums differently
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("v_dim", [16, 24, 40], ids=["v_narrower", "equal", "v_wider"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_with_padded_head_dims_matches_attention_written_out(v_dim, masked):
    """From FLASH_MIN_LEN keys on, the narrower of the q/k and v head dims is zero-padded; the output is unchanged."""
    g = torch.Generator().manual_seed(0)
    S, T = 5, ops.FLASH_MIN_LEN + 3
    q, k = torch.randn(2, 3, S, 24, generator=g), torch.randn(2, 3, T, 24, generator=g)
    v = torch.randn(2, 3, T, v_dim, generator=g)
    mask = torch.rand(2, 1, S, T, generator=g) < 0.7 if masked else None
    if masked:
        mask[..., 0] = True  # every query sees a key
    else:
        q, S = torch.randn(2, 3, T, 24, generator=g), T  # causal: S == T
    got = ops.attention_sdpa(q, k, v, mask, 0.3)
    want = torch.stack([torch.stack([  # one (batch, head) at a time, as the formula reads
        ((q[b, h] @ k[b, h].T * 0.3).masked_fill(
            ~(mask[b, 0] if masked else torch.ones(T, T, dtype=torch.bool).tril()), float("-inf"))
         .softmax(-1) @ v[b, h]) for h in range(3)]) for b in range(2)])
    assert got.shape == (2, 3, S, v_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.attention_reference(q, k, v, mask, 0.3), want, atol=1e-5, rtol=1e-5)
