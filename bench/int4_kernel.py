"""openseek's int4 CPU kernel (model/csrc/quant_cpu.cpp) against PyTorch's (torch._weight_int4pack_mm_for_cpu) on
the same packed weights, in one run: M rows times one weight, and batch-1 decode's routed experts (K pairs, each its
own expert) as one indexed call against PyTorch's kernel called once per pair.

    python bench/int4_kernel.py [--threads N] [--repeats 7]

Each case cycles through enough copies of its weight (64 MB in all) that every call reads from memory, not cache,
as decode does. Read rate = the int4 bytes / time; ratio = PyTorch's time / openseek's. Errors: the largest
difference from the dequantised weight in float64, relative to the largest output (PyTorch's kernel rounds the
activations to bf16, openseek's keeps float32).
"""

from __future__ import annotations

import argparse
import copy

import torch

from common import kernel_bench_args, machine_line, markdown_table, time_interleaved

from openseek.model import cpu_kernels
from openseek.model.quant import QuantizedWeight

SHAPES = {  # name: (O, I, group), the bench checkpoint's and DeepSeek-V2-Lite's
    "q_proj 3072x1024": (3072, 1024, 128), "kv_a 576x1024": (576, 1024, 128), "o_proj 1024x2048": (1024, 2048, 128),
    "expert 352x1024": (352, 1024, 32), "expert down 1024x352": (1024, 352, 32),
    "lm_head 32000x1024": (32000, 1024, 128), "V2-Lite expert 1408x2048": (1408, 2048, 128),
    "V2-Lite lm_head 102400x2048": (102400, 2048, 128)}
EXPERTS = {"bench experts (64, 352x1024)": (64, 352, 1024, 32), "V2-Lite experts (64, 1408x2048)": (64, 1408, 2048, 128)}
CACHE_BYTES = 64 * 2**20  # copies of each weight up to this many bytes, so that calls read memory
K = 6  # experts per token


def int4(shape: tuple[int, ...], group: int) -> QuantizedWeight:
    qw = QuantizedWeight("int4", shape, group, torch.float32, "cpu")
    w = torch.randn(shape)
    for e in range(shape[0]) if len(shape) == 3 else [None]:
        qw.set(w if e is None else w[e], e)
    return qw


def copies(shape: tuple[int, ...], group: int) -> list[QuantizedWeight]:
    one = int4(shape, group)
    return [one] + [copy.deepcopy(one) for _ in range(CACHE_BYTES // one.qweight.numel() - 1)]


def relative_error(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.double() - want).abs().max() / want.abs().max()).item()


def linear_rows(args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for name, (O, I, group) in SHAPES.items():
        ws = copies((O, I), group)
        for M in (1, 4, 16):
            x = torch.randn(M, I)
            xb = x.to(torch.bfloat16)
            want = x.double() @ ws[0].dequantize().double().T
            ours = torch.ops.openseek_cpu.int4_mm(x, ws[0].qweight, ws[0].scale, group)[:, :O]
            theirs = torch._weight_int4pack_mm_for_cpu(xb, ws[0].qweight, group, ws[0].scale)[:, :O]
            fns = {"openseek": lambda: [torch.ops.openseek_cpu.int4_mm(x, w.qweight, w.scale, group) for w in ws],
                   "pytorch": lambda: [torch._weight_int4pack_mm_for_cpu(xb, w.qweight, group, w.scale) for w in ws]}
            rows.append(row(name, M, fns, len(ws), O * I // 2, args, relative_error(ours, want),
                            relative_error(theirs, want)))
    return rows


def expert_rows(args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for name, (E, O, I, group) in EXPERTS.items():
        w = int4((E, O, I), group)
        n = max(1, CACHE_BYTES // (K * O * I // 2))  # tokens, each choosing K other experts
        ids = [torch.randperm(E)[:K] for _ in range(n)]
        x = torch.randn(K, I)
        xb = x.to(torch.bfloat16)
        want = torch.einsum("ki,koi->ko", x.double(), w.dequantize().double()[ids[0]])
        ours = torch.ops.openseek_cpu.int4_mm_indexed(x, w.qweight, w.scale, ids[0], group)[:, :O]
        theirs = torch.cat([torch._weight_int4pack_mm_for_cpu(xb[k:k + 1], w.qweight[e], group, w.scale[e])
                            for k, e in enumerate(ids[0].tolist())])[:, :O]
        fns = {"openseek": lambda: [torch.ops.openseek_cpu.int4_mm_indexed(x, w.qweight, w.scale, i, group)
                                    for i in ids],
               "pytorch": lambda: [torch._weight_int4pack_mm_for_cpu(xb[k:k + 1], w.qweight[e], group, w.scale[e])
                                   for i in ids for k, e in enumerate(i.tolist())]}
        rows.append(row(name, f"{K} pairs", fns, n, K * O * I // 2, args, relative_error(ours, want),
                        relative_error(theirs, want)))
    return rows


def row(name: str, M, fns: dict, calls: int, nbytes: int, args: argparse.Namespace, err_ours: float,
        err_theirs: float) -> list[str]:
    t = {k: v.min_s / calls for k, v in time_interleaved(fns, repeats=args.repeats).items()}
    gbs = {k: nbytes / v / 1e9 for k, v in t.items()}
    return [name, str(M), *(f"{1e6 * t[k]:.0f} ({gbs[k]:.1f})" for k in ("openseek", "pytorch")),
            f"{t['pytorch'] / t['openseek']:.2f}x", f"{err_ours:.1e} / {err_theirs:.1e}"]


def main() -> None:
    args = kernel_bench_args(__doc__)
    if not cpu_kernels.load():
        raise SystemExit("openseek's int4 kernel is not built on this machine (see the log): nothing to compare")
    print(machine_line())
    with torch.inference_mode():
        rows = linear_rows(args) + expert_rows(args)
    print(markdown_table(["weight", "rows", "openseek us (GB/s)", "pytorch us (GB/s)", "pytorch / openseek",
                          "max error openseek / pytorch"], rows))


if __name__ == "__main__":
    main()
