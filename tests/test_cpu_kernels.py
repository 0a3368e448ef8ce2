"""openseek's own CPU kernels (model/cpu_kernels.py, model/csrc/): int4_mm and int4_mm_indexed against the
dequantised weight in float64, one row against many (a row's result must not depend on its batch), the indexed
kernel against the plain one, int8_head_mm (MLA's absorbed products) against bmm, bad input, and the paths through
ops with the kernels and with PyTorch's instead."""

from __future__ import annotations

import pytest
import torch

from openseek.model import cpu_kernels, ops
from openseek.model.ops import experts_inference, experts_reference, linear_dense, linear_inference
from openseek.model.quant import QuantizedWeight

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
pytestmark = pytest.mark.skipif(not AVX512, reason="openseek's int4 kernel is built only on x86 with AVX-512")


def int4_weight(E: int | None, O: int, I: int, group: int, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """A random int4 weight (a stack of E when E) and its dequantised float64 value."""
    g = torch.Generator().manual_seed(seed)
    shape = (O, I) if E is None else (E, O, I)
    qw = QuantizedWeight("int4", shape, group, torch.float32, "cpu")
    w = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g)  # rows of different ranges
    for e in [None] if E is None else range(E):
        qw.set(w if e is None else w[e], e)
    return qw, qw.dequantize().double()


def test_the_kernel_builds_where_it_should():
    # where the machine has AVX-512 and a compiler, a failed build is a bug, not a fallback to skip over
    assert cpu_kernels.load() and cpu_kernels.loaded()
    assert ops.INFERENCE.head_bmm is ops.head_bmm_inference


# rows: whole 64-row blocks, and a last block of 16, 32 or 48 (the layout pairs its rows differently)
@pytest.mark.parametrize("O,I,group", [(128, 256, 128), (80, 128, 32), (96, 192, 64), (112, 64, 32), (3, 64, 64)])
@pytest.mark.parametrize("M", [1, 3, 6])
def test_int4_mm_matches_the_dequantised_weight(O, I, group, M):
    qw, w = int4_weight(None, O, I, group)
    x = torch.randn(M, I, generator=torch.Generator().manual_seed(M))
    got = torch.ops.openseek_cpu.int4_mm(x, qw.qweight, qw.scale, group)
    assert got.dtype == torch.float32 and got.shape == (M, qw.qweight.shape[0])
    want = x.double() @ w.T  # (M, O)
    torch.testing.assert_close(got[:, :O].double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert (got[:, O:] == 0).all()  # padding rows hold the value 0


def test_int4_mm_gives_a_row_the_same_bits_in_any_batch():
    qw, _ = int4_weight(None, 176, 256, 64)
    x = torch.randn(7, 256)  # 4 rows take the 4-row loop, 3 the one-row loop
    batch = torch.ops.openseek_cpu.int4_mm(x, qw.qweight, qw.scale, 64)
    alone = torch.cat([torch.ops.openseek_cpu.int4_mm(x[m:m + 1], qw.qweight, qw.scale, 64) for m in range(7)])
    assert torch.equal(batch, alone)


def test_int4_mm_indexed_runs_each_row_on_its_own_matrix():
    qw, w = int4_weight(5, 96, 128, 32)
    x, ids = torch.randn(6, 128), torch.tensor([4, 0, 4, 2, 1, 1])
    got = torch.ops.openseek_cpu.int4_mm_indexed(x, qw.qweight, qw.scale, ids, 32)
    one = [torch.ops.openseek_cpu.int4_mm(x[m:m + 1], qw.qweight[e], qw.scale[e], 32) for m, e in enumerate(ids)]
    assert torch.equal(got, torch.cat(one))
    want = torch.einsum("mi,moi->mo", x.double(), w[ids])  # (M, O)
    torch.testing.assert_close(got[:, :96].double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_bad_input_is_named():
    qw, _ = int4_weight(3, 32, 64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 3 is not in \[0, 3\)"):
        torch.ops.openseek_cpu.int4_mm_indexed(x, qw.qweight, qw.scale, torch.tensor([0, 3]), 32)
    with pytest.raises(RuntimeError, match="expected ids"):
        torch.ops.openseek_cpu.int4_mm_indexed(x, qw.qweight, qw.scale, torch.tensor([0, 1], dtype=torch.int32), 32)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.openseek_cpu.int4_mm(torch.randn(2, 96), qw.qweight[0], qw.scale[0], 32)
    with pytest.raises(RuntimeError, match="expected uint8 qweight"):
        torch.ops.openseek_cpu.int4_mm(x, qw.qweight[0].to(torch.int8), qw.scale[0], 32)


@pytest.mark.parametrize("G", [1, 4], ids=["int8-per-row", "int4-groups"])
def test_eager_head_bmm_on_int_values_matches_bmm_and_a_row_ignores_its_batch(G):
    """MLA's absorbed products on a quantised wkv_b's int values (mla.MLA._absorb_int8) through int8_head_mm: W_UK^T's
    scales vary along the summed dim, W_UV's along the output; both against bmm on the float weight in float64."""
    g = torch.Generator().manual_seed(G)
    H, Q, C = 3, 16, 32
    q = torch.randint(-128, 128, (H, 2 * Q, C), dtype=torch.int8, generator=g)  # (H, Q + U, C) as wkv_b holds them
    s = torch.rand(H, 2 * Q, G, generator=g) + 0.5
    w = (q.float().view(H, 2 * Q, G, -1) * s[..., None]).view(H, 2 * Q, C)
    for K, w_HKN, q_HNK, s_HGG in [(Q, w[:, :Q], q[:, :Q].transpose(1, 2), s[:, :Q].transpose(1, 2)),
                                   (C, w[:, Q:].transpose(1, 2), q[:, Q:], s[:, Q:])]:
        int8 = (q_HNK.contiguous(), s_HGG.contiguous())
        x = torch.randn(H, 3, K, generator=g)
        want = torch.bmm(x.double(), w_HKN.double())
        got = ops.head_bmm_inference(x, w_HKN, int8)
        torch.testing.assert_close(got.double(), want, atol=1e-6 * want.abs().max().item(), rtol=0)
        assert torch.equal(got[:, 1:2], ops.head_bmm_inference(x[:, 1:2], w_HKN, int8))


def test_int8_head_mm_names_bad_input():
    q, s = torch.zeros(2, 8, 16, dtype=torch.int8), torch.ones(2, 8, 1)
    with pytest.raises(RuntimeError, match="expected float32 x, int8 q"):
        torch.ops.openseek_cpu.int8_head_mm(torch.zeros(2, 1, 1, 16, dtype=torch.float64), q, s)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.openseek_cpu.int8_head_mm(torch.zeros(2, 1, 1, 12), q, s)


@pytest.mark.parametrize("ours", [True, False], ids=["openseek-kernel", "pytorch-kernel"])
def test_int4_linear_and_experts_match_the_reference_on_either_kernel(ours, monkeypatch):
    monkeypatch.setitem(cpu_kernels._built, "openseek_cpu", ours)
    lin, _ = int4_weight(None, 80, 128, 32)
    x = torch.randn(3, 128)
    want = linear_dense(x, lin)
    # PyTorch's kernel takes bf16 activations, openseek's float32
    tol = (1e-5 if ours else 1e-2) * want.abs().max().item()
    torch.testing.assert_close(linear_inference(x, lin), want, atol=tol, rtol=0)
    (w1, _), (w3, _), (w2, _) = (int4_weight(8, *s, 32, seed=i) for i, s in enumerate([(64, 96), (64, 96), (96, 64)]))
    for N in (1, 4):
        x = torch.randn(N, 96)
        weights, ids = torch.rand(N, 2), torch.stack([torch.randperm(8)[:2] for _ in range(N)])
        want = experts_reference(w1, w2, w3, x, weights, ids)
        tol = (1e-4 if ours else 2e-2) * want.abs().max().item()
        torch.testing.assert_close(experts_inference(w1, w2, w3, x, weights, ids), want, atol=tol, rtol=0)


def test_compiled_int4_linear_calls_the_kernel_without_a_graph_break():
    lin, _ = int4_weight(None, 64, 128, 64)
    x = torch.randn(1, 128)
    explain = torch._dynamo.explain(lambda x: ops.linear_compiled(x, lin))(x)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    torch.testing.assert_close(torch.compile(lambda x: ops.linear_compiled(x, lin))(x), linear_dense(x, lin),
                               atol=1e-4, rtol=1e-4)
