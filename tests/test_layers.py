"""RMSNorm's hand-written backward against autograd through the plain formula; Linear against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openseek.model.layers import Linear, RMSNorm


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

    got = norm(x)
    want = formula(x)
    with torch.no_grad():  # the inference path (F.rms_norm) agrees too
        torch.testing.assert_close(norm(x), want)
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
        want = norm(x).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm(x)
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
    got, want = lin(x), F.linear(x, lin.weight)
    assert got.shape == want.shape == (1, rows, 48) and got.dtype == dtype
    tol = 0 if dtype == torch.float32 else 2e-2  # mv and the GEMM may round the bf16 sums differently
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
