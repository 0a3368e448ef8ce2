"""openseek's own CPU kernels (csrc/), built once per machine for its instruction set on first use, as inductor
builds its C++, and cached on disk by torch.utils.cpp_extension; where they cannot be built the callers run
PyTorch's kernels instead, and the reason is logged.

csrc/quant_cpu.cpp, the `openseek_cpu` ops, all on float32 activations: int4_mm, x W^T for int4 weights in PyTorch's
CPU layout (quant.py); int4_mm_indexed, each row of x times its own matrix of a stack (routed experts' pairs);
int8_head_mm, MLA's absorbed per-head products on a quantised wkv_b's int values. Built only on x86 with AVX-512,
where they beat PyTorch's kernels (bench/results/int4_kernel.txt); elsewhere their plain loops would not.
OPENSEEK_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "quant_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # built where it runs: the host's vector instructions
_built: dict[str, bool] = {}  # "openseek_cpu" -> whether it loaded; filled once, read by loaded() (traceable)


def load() -> bool:
    """Build and load the openseek_cpu ops if this machine can; whether they are loaded. Called when a quantised
    weight is made, so that the build (seconds, once per machine) never happens inside a compiled trace."""
    if "openseek_cpu" not in _built:
        _built["openseek_cpu"] = _build()
    return _built["openseek_cpu"]


def loaded() -> bool:
    """Whether the openseek_cpu ops are there to call."""
    return _built.get("openseek_cpu", False)


def _build() -> bool:
    if os.environ.get("OPENSEEK_CPU_KERNELS", "1") == "0":
        logger.info("OPENSEEK_CPU_KERNELS=0: quantised weights run on PyTorch's kernels")
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("no AVX-512 (%s): quantised weights run on PyTorch's kernels", torch.backends.cpu.get_cpu_capability())
        return False
    try:
        from torch.utils.cpp_extension import load
        load(name="openseek_cpu", sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False)
    except Exception as e:  # no compiler or ninja, a read-only cache: the fallback is PyTorch's kernel
        logger.warning("openseek's CPU kernels did not build (%s: %s): quantised weights run on PyTorch's kernels",
                       type(e).__name__, e)
        return False

    @torch.library.register_fake("openseek_cpu::int4_mm")
    def _(x, qweight, scale, group):
        return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("openseek_cpu::int4_mm_indexed")
    def _(x, qweight, scale, ids, group):
        return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.float32)

    @torch.library.register_fake("openseek_cpu::int8_head_mm")
    def _(x, q, s):
        return x.new_empty(q.shape[0], x.shape[1], q.shape[1], dtype=torch.float32)

    return True
