"""openseek's own CPU kernels (csrc/), built once per machine for its instruction set on first use, as inductor
builds its C++, and cached on disk by torch.utils.cpp_extension; where they cannot be built the callers run
PyTorch's kernels instead, and the reason is logged.

int4_mm: x W^T for int4 weights in PyTorch's CPU layout (quant.py), on float32 activations; int4_mm_indexed: each row
of x times its own matrix of a stack (routed experts' pairs). Built only on x86 with AVX-512, where they beat PyTorch's
own kernel (bench/results/int4_kernel.txt); elsewhere their plain loops would not.
OPENSEEK_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "int4_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # built where it runs: the host's vector instructions
_built: dict[str, bool] = {}  # kernel -> whether it loaded; filled once, read by int4_loaded() (traceable)


def load_int4() -> bool:
    """Build and load openseek_cpu::int4_mm if this machine can; whether it is loaded. Called when an int4 weight is
    made, so that the build (seconds, once per machine) never happens inside a compiled trace."""
    if "int4" not in _built:
        _built["int4"] = _build_int4()
    return _built["int4"]


def int4_loaded() -> bool:
    """Whether openseek_cpu::int4_mm is there to call."""
    return _built.get("int4", False)


def _build_int4() -> bool:
    if os.environ.get("OPENSEEK_CPU_KERNELS", "1") == "0":
        logger.info("OPENSEEK_CPU_KERNELS=0: int4 weights run on PyTorch's kernel")
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("no AVX-512 (%s): int4 weights run on PyTorch's kernel", torch.backends.cpu.get_cpu_capability())
        return False
    try:
        from torch.utils.cpp_extension import load
        load(name="openseek_cpu", sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False)
    except Exception as e:  # no compiler or ninja, a read-only cache: the fallback is PyTorch's kernel
        logger.warning("openseek's int4 CPU kernel did not build (%s: %s): int4 weights run on PyTorch's kernel",
                       type(e).__name__, e)
        return False

    @torch.library.register_fake("openseek_cpu::int4_mm")
    def _(x, qweight, scale, group):
        return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("openseek_cpu::int4_mm_indexed")
    def _(x, qweight, scale, ids, group):
        return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.float32)

    return True
