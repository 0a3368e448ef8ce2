"""One row times a weight (batch-1 decode's every matmul) three ways, in one run: the eager INFERENCE kernel
(ops.linear_inference: MKL's sgemm, torch.mv for bf16, PyTorch's int8 packed kernel), the same inside a
torch.compile graph (what COMPILED ran before), and COMPILED's multiply-and-sum (ops.linear_compiled), which
inductor generates as one loop reading each weight once with the upcast / dequantisation fused.

    python bench/compiled_gemv.py [--threads N] [--repeats 7]

Shapes: the bench checkpoint's projections, dense FFN, an expert and lm_head, and DeepSeek-V2-Lite's expert
and lm_head. Read rate = the weight's bytes / time; ratio = the eager kernel's time / the multiply-and-sum's.
"""

from __future__ import annotations


import torch

from common import kernel_bench_args, machine_line, markdown_table, time_interleaved

from openseek.model import ops
from openseek.model.quant import QuantizedWeight

SHAPES = {  # name: (O, I)
    "q_proj 3072x1024": (3072, 1024), "kv_a 576x1024": (576, 1024), "o_proj 1024x2048": (1024, 2048),
    "dense up 2816x1024": (2816, 1024), "dense down 1024x2816": (1024, 2816), "expert 352x1024": (352, 1024),
    "lm_head 32000x1024": (32000, 1024), "V2-Lite expert 1408x2048": (1408, 2048),
    "V2-Lite lm_head 102400x2048": (102400, 2048)}
INNER = 10  # calls per timed run


def weight(O: int, I: int, fmt: str) -> torch.Tensor | QuantizedWeight:
    w = torch.randn(O, I) / I**0.5
    if fmt != "int8":
        return w.to(getattr(torch, fmt))
    qw = QuantizedWeight("int8", (O, I), None, torch.float32, "cpu")
    qw.set(w)
    return qw


def nbytes(w: torch.Tensor | QuantizedWeight) -> int:
    t = w.qweight if isinstance(w, QuantizedWeight) else w
    return t.numel() * t.element_size()


def main() -> None:
    args = kernel_bench_args(__doc__)
    torch._dynamo.config.recompile_limit = 64
    print(machine_line())
    compiled = {name: torch.compile(fn, dynamic=True, options={"cpp_wrapper": True})
                for name, fn in (("library", ops.linear_inference), ("sum", ops.linear_compiled))}
    rows = []
    with torch.inference_mode():
        for shape, (O, I) in SHAPES.items():
            for fmt in ("float32", "bfloat16", "int8"):
                w = weight(O, I, fmt)
                x = torch.randn(1, I, dtype=torch.bfloat16 if fmt == "bfloat16" else torch.float32)
                fns = {"eager": lambda: ops.linear_inference(x, w), "compiled": lambda: compiled["library"](x, w),
                       "sum": lambda: compiled["sum"](x, w)}
                torch.testing.assert_close(fns["sum"]().float(), ops.linear_dense(x.float(), ops.dense(w).float()),
                                           atol=2e-2, rtol=2e-2)
                loops = {k: (lambda f=f: [f() for _ in range(INNER)]) for k, f in fns.items()}
                t = {k: v.min_s / INNER for k, v in time_interleaved(loops, repeats=args.repeats).items()}
                gbs = {k: nbytes(w) / v / 1e9 for k, v in t.items()}
                rows.append([shape, fmt, *(f"{1e6 * t[k]:.0f} ({gbs[k]:.1f})" for k in fns),
                             f"{t['eager'] / t['sum']:.2f}x", f"{t['compiled'] / t['sum']:.2f}x"])
    print(markdown_table(["weight", "format", "eager kernel us (GB/s)", "compiled library us (GB/s)",
                          "compiled sum us (GB/s)", "eager / sum", "compiled library / sum"], rows))


if __name__ == "__main__":
    main()
