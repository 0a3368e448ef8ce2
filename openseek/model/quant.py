"""Weight-only int8 / int4 quantisation: the scheme, the QuantizedWeight that stands in for a float weight, and
the compressed-tensors checkpoint layout (what vLLM and transformers read).

int8: symmetric per output channel, w ~ q * s with q in [-127, 127] and s = absmax(row) / 127 (compressed-tensors
"int-quantized": an int8 `weight` and a `weight_scale` (out, 1)).
int4: symmetric per group of `group_size` input columns, q in [-8, 7], s = absmax(group) / 7 (compressed-tensors
"pack-quantized": `weight_packed` int32 (out, in/8) holding q + 8 in 4-bit fields, the first column lowest,
`weight_scale` (out, in/group), `weight_shape` [out, in]).
Scales are rounded to bfloat16 before q is computed with them, so |w - q * s| <= s / 2 holds for the stored s.
compressed-tensors computes s = absmax / 127.5 (7.5) and clamps; any s reads back the same (w = q * s), ours
keeps the bound exact.

In memory a QuantizedWeight holds int8 weights as they are and int4 weights in the layout of PyTorch's CPU kernel
(`torch._convert_weight_to_int4pack_for_cpu`: blocks of 64 rows, each stored column-major with rows n and n + 32
in one byte; the last partial block pairs adjacent rows), rows padded to a multiple of 16 (the kernel's N
granularity), which openseek's own int4 kernel (cpu_kernels.py) reads too. Stacked experts are one QuantizedWeight
with leading dims (E, out, in).

Shapes: E experts (a leading dim of stacked weights), O output features, I input features, G groups (I / group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import cpu_kernels

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel takes
INT4_ROWS = 16  # the CPU int4 kernel packs rows in multiples of this
SCALE_DTYPE = torch.bfloat16  # the kernels run on bf16 activations, with bf16 scales
QMAX = {"int8": 127, "int4": 7}
METHOD = "compressed-tensors"
FORMATS = {"int8": "int-quantized", "int4": "pack-quantized"}
ROUTER_IGNORE = "re:.*mlp.gate$"  # the router stays float32, as llm-compressor's DeepSeek recipes leave it


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """Which weights are quantised and how: every matmul weight but the router and the embedding; lm_head if `head`."""

    name: str  # "int8" | "int4"
    group_size: int | None = None  # int4's input columns per scale; None for int8 (per channel)
    head: bool = False

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"quantization={self.name!r} is not a known scheme: allowed {', '.join(SCHEMES)}")
        if self.name == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={self.group_size!r} is invalid: allowed "
                             f"{', '.join(map(str, GROUP_SIZES))} (the CPU int4 kernel's)")

    def to_config(self) -> dict:
        """The compressed-tensors quantization_config for config.json."""
        int8 = self.name == "int8"
        weights = {"num_bits": 8 if int8 else 4, "type": "int", "symmetric": True,
                   "strategy": "channel" if int8 else "group", "group_size": None if int8 else self.group_size,
                   "dynamic": False, "observer": "minmax", "actorder": None, "block_structure": None}
        group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                 "format": FORMATS[self.name]}
        return {"quant_method": METHOD, "format": FORMATS[self.name], "quantization_status": "compressed",
                "config_groups": {"group_0": group}, "ignore": ([] if self.head else ["lm_head"]) + [ROUTER_IGNORE],
                "kv_cache_scheme": None, "sparsity_config": {}}


def scheme_of(qc: dict | None) -> QuantScheme | None:
    """The scheme of a checkpoint's quantization_config: None for float and for fp8 blocks (dequantised on load)."""
    if qc is None or qc.get("quant_method", "fp8") == "fp8":  # older fp8 configs name only weight_block_size
        return None
    where = "quantization_config"
    if qc.get("quant_method") != METHOD:
        raise ValueError(f"{where}.quant_method={qc.get('quant_method')!r} is not supported: openseek reads fp8 "
                         f"(DeepSeek-V3's blocks) and {METHOD} int8 (int-quantized) / int4 (pack-quantized)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{where}.config_groups={groups!r} is invalid: one group of Linear targets expected")
    name, group = next(iter(groups.items()))
    w = group.get("weights") or {}
    where = f"{where}.config_groups.{name}.weights"
    if group.get("input_activations") or not w.get("symmetric", False) or w.get("type", "int") != "int":
        raise ValueError(f"{where}={w!r} is not supported: weight-only symmetric int quantisation expected")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    fmt = group.get("format") or qc.get("format")
    if (bits, strategy, fmt) == (8, "channel", FORMATS["int8"]):
        scheme = QuantScheme("int8")
    elif (bits, strategy, fmt) == (4, "group", FORMATS["int4"]):
        scheme = QuantScheme("int4", w.get("group_size"))
    else:
        raise ValueError(f"{where}: num_bits={bits!r}, strategy={strategy!r}, format={fmt!r} is not supported: "
                         f"allowed 8/channel/{FORMATS['int8']} and 4/group/{FORMATS['int4']}")
    return QuantScheme(scheme.name, scheme.group_size, head="lm_head" not in (qc.get("ignore") or []))


# ---- quantising and (un)packing ---------------------------------------------------------------------------------

def quantize(w: torch.Tensor, scheme: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) float -> q int8 (..., O, I) and bf16 scales (..., O) for int8, (..., O, G) for int4."""
    qmax = QMAX[scheme]
    wf = w.float() if scheme == "int8" else w.float().unflatten(-1, (-1, group_size))  # (..., O, G, group)
    scale = (wf.abs().amax(-1) / qmax).clamp_(min=1e-12).to(SCALE_DTYPE)  # rounded first: the bound holds for it
    q = (wf / scale.float()[..., None]).round_().clamp_(-qmax - (scheme == "int4"), qmax).to(torch.int8)
    return q.flatten(-2) if scheme == "int4" else q, scale


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """int4 values q (O, I) in [-8, 7] -> compressed-tensors' weight_packed (O, I/8) int32, column 8j lowest."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    v = ((q.to(torch.int64) + 8).unflatten(-1, (-1, 8)) << shifts).sum(-1)  # (O, I/8) in [0, 2^32)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def unpack_int32(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """weight_packed (O, I/8) int32 -> int4 values (O, I) int8 in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed[..., None] >> shifts) & 15  # (O, I/8, 8)
    return (u.flatten(-2)[..., :cols] - 8).to(torch.int8)


def to_cpu_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values q (O, I) -> the CPU kernel's packed uint8 (O', I/2), rows zero-padded to O' (multiple of 16)."""
    O, I = q.shape
    rows = math.ceil(O / INT4_ROWS) * INT4_ROWS
    u = torch.full((rows, I), 8, dtype=torch.int32, device=q.device)  # padding rows hold the value 0
    u[:O] = q.to(torch.int32) + 8
    return torch._convert_weight_to_int4pack_for_cpu(u, 1)


def from_cpu_int4(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The CPU kernel's packed (O', I/2) -> int4 values (rows, I) int8: to_cpu_int4's inverse (tested)."""
    O, I = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(O, I, dtype=torch.int32, device=packed.device)
    flat, full = packed.reshape(-1).to(torch.int32), O // 64 * 64
    if full:
        b = flat[: full * I // 2].view(full // 64, I, 32)  # (blocks, I, 32): rows j and j + 32 in one byte
        out[:full] = torch.cat([b & 15, b >> 4], 2).transpose(1, 2).reshape(full, I)
    if O > full:
        t = flat[full * I // 2:].view(I, (O - full) // 2)  # the last block: adjacent rows in one byte
        out[full:] = torch.stack([t & 15, t >> 4], 2).reshape(I, O - full).T
    return (out[:rows] - 8).to(torch.int8)


# ---- the weight object -------------------------------------------------------------------------------------------

class QuantizedMath:
    """The arithmetic of a quantised (..., O, I) weight over the attributes its holders define (QuantizedParts'
    fields): `scheme`, `shape`, `group_size`, `dtype` (the float type it stands for, dequantize()'s), the int
    values `qweight` and their `scale`s. The kernels (ops.py) call matmul_packed() and dequantize()."""

    def scales(self, index: int | None = None) -> torch.Tensor:
        """The scales of matrix `index`: (O,) for int8, (O, G) for int4."""
        sc = self.scale if index is None else self.scale[index]
        return sc if self.scheme == "int8" else sc[:, : self.shape[-2], 0].T

    def quantized(self, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int values (O, I) int8 and scales of matrix `index`: what a checkpoint stores."""
        qw = self.qweight if index is None else self.qweight[index]
        if self.scheme == "int4":
            qw = from_cpu_int4(qw.cpu(), self.shape[-2]).to(qw.device)
        return qw, self.scales(index)

    def dequantize(self, index: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight q * s: one matrix (O, I), or the whole stack when the weight is stacked and index None."""
        dtype = dtype or self.dtype
        if index is None and len(self.shape) > 2:
            return torch.stack([self.dequantize(e, dtype) for e in range(self.shape[0])])
        q, s = self.quantized(index)
        if self.scheme == "int8":
            return (q.float() * s.float()[:, None]).to(dtype)
        return (q.float().unflatten(-1, (-1, self.group_size)) * s.float()[..., None]).flatten(-2).to(dtype)

    @property
    def kernel_dtype(self) -> torch.dtype:
        """The activations' dtype matmul_packed takes: float32 for openseek's int4 kernel, bf16 for PyTorch's
        (their float32 paths read int8 weights at a tenth of the speed, int4 at a thirtieth)."""
        return torch.float32 if self.scheme == "int4" and cpu_kernels.loaded() else torch.bfloat16

    def matmul_packed(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x (M, I) contiguous, of kernel_dtype -> x W^T (M, O) through the CPU weight-only kernels: openseek's for
        int4 where it is built (cpu_kernels.py), PyTorch's otherwise. The output is float32 or bf16."""
        qw = self.qweight if index is None else self.qweight[index]
        sc = self.scale if index is None else self.scale[index]
        if self.scheme == "int8":
            return torch._weight_int8pack_mm(x, qw, sc)
        if cpu_kernels.loaded():
            return torch.ops.openseek_cpu.int4_mm(x, qw, sc, self.group_size)[:, : self.shape[-2]]
        return torch._weight_int4pack_mm_for_cpu(x, qw, self.group_size, sc)[:, : self.shape[-2]]

    def matmul_indexed(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row m of x (M, I) times matrix ids[m] of this int4 stack -> (M, O) float32, in one call of openseek's
        kernel (only where cpu_kernels.loaded())."""
        return torch.ops.openseek_cpu.int4_mm_indexed(x, self.qweight, self.scale, ids, self.group_size)[
            :, : self.shape[-2]]


@dataclass(frozen=True)
class QuantizedParts(QuantizedMath):
    """A QuantizedWeight's tensors and scheme as plain fields: what a custom op, which takes tensors, not modules,
    rebuilds to run the same arithmetic (ops.experts_quantized_op)."""

    scheme: str
    shape: tuple[int, ...]
    group_size: int | None
    dtype: torch.dtype
    qweight: torch.Tensor
    scale: torch.Tensor


class QuantizedWeight(QuantizedMath, nn.Module):
    """A quantised (..., O, I) weight held where a Linear's `weight` or an Experts' `w1` was: buffers, so .to(),
    state_dict() and buffers() see it; parameters() does not (it is not trained)."""

    def __init__(self, scheme: str, shape: tuple[int, ...], group_size: int | None, dtype: torch.dtype,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.scheme, self.shape, self.group_size, self.dtype = scheme, tuple(shape), group_size, dtype
        cpu_kernels.load()  # built now (once per machine), never inside a compiled trace
        *lead, O, I = shape
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(*lead, O, I, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(*lead, O, dtype=SCALE_DTYPE, device=device))
        else:
            rows = math.ceil(O / INT4_ROWS) * INT4_ROWS
            self.register_buffer("qweight", torch.empty(*lead, rows, I // 2, dtype=torch.uint8, device=device))
            # the kernel's (G, O', 2) scales-and-zeros; the zeros are 0 (symmetric)
            self.register_buffer("scale", torch.zeros(*lead, I // group_size, rows, 2, dtype=SCALE_DTYPE,
                                                      device=device))

    def _apply(self, fn, recurse: bool = True):
        """model.to(dtype) changes the float type this weight stands for; its ints and bf16 scales stay."""
        super()._apply(fn, recurse)
        self.scale = self.scale.to(SCALE_DTYPE)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={self.shape}, group_size={self.group_size}, dtype={self.dtype}"

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, index: int | None = None) -> None:
        """Store int values q (O, I) and their scales ((O,) or (O, G)) as matrix `index` of a stack."""
        qw = self.qweight if index is None else self.qweight[index]
        sc = self.scale if index is None else self.scale[index]
        if self.scheme == "int8":
            qw.copy_(q)
            sc.copy_(scale.reshape(sc.shape))
        else:
            qw.copy_(to_cpu_int4(q.to(qw.device)))
            sc[:, : q.shape[0], 0].copy_(scale.T)  # (G, O)

    def set(self, w: torch.Tensor, index: int | None = None) -> None:
        """Quantise the float matrix w (O, I) into matrix `index`."""
        self.set_quantized(*quantize(w, self.scheme, self.group_size), index=index)


# ---- compressed-tensors checkpoints ----------------------------------------------------------------------------

PARTS = {"int8": ("weight", "weight_scale"), "int4": ("weight_packed", "weight_scale", "weight_shape")}


def part_names(hf: str, scheme: QuantScheme) -> dict[str, str]:
    """part -> tensor name in a quantised checkpoint, for the hub weight `hf` (`...q_proj.weight`)."""
    base = hf.removesuffix("weight")
    return {part: base + part for part in PARTS[scheme.name]}


def part_shapes(shape: tuple[int, ...], scheme: QuantScheme) -> dict[str, tuple[int, ...]]:
    """part -> its shape in a quantised checkpoint, for a weight of shape (O, I)."""
    O, I = shape
    if scheme.name == "int8":
        return {"weight": (O, I), "weight_scale": (O, 1)}
    return {"weight_packed": (O, I // 8), "weight_scale": (O, I // scheme.group_size), "weight_shape": (2,)}


def read_parts(read: Callable[[str], torch.Tensor], hf: str, scheme: QuantScheme,
               shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised checkpoint's int values (O, I) and scales of the hub weight `hf`, read by name with `read`."""
    names = part_names(hf, scheme)
    scale = read(names["weight_scale"])
    if scheme.name == "int8":
        q = read(names["weight"])
        if q.dtype != torch.int8:
            raise ValueError(f"{names['weight']}: dtype {q.dtype}, expected torch.int8 (format int-quantized)")
        return q, scale.reshape(-1)
    packed, stored_shape = read(names["weight_packed"]), read(names["weight_shape"]).tolist()
    if packed.dtype != torch.int32 or stored_shape != list(shape):
        raise ValueError(f"{names['weight_packed']}: dtype {packed.dtype} and weight_shape {stored_shape}, expected "
                         f"torch.int32 and {list(shape)} (format pack-quantized)")
    return unpack_int32(packed, shape[1]), scale


def checkpoint_parts(hf: str, qw: QuantizedWeight, j: int | None, scheme: QuantScheme
                     ) -> dict[str, tuple[int, Callable[[], torch.Tensor]]]:
    """The compressed-tensors parts of one quantised matrix: name -> (bytes, the tensor on demand)."""
    O, I = qw.shape[-2:]
    names, sizes = part_names(hf, scheme), part_shapes((O, I), scheme)
    if scheme.name == "int8":
        make = {"weight": lambda: qw.quantized(j)[0].cpu().clone(),
                "weight_scale": lambda: qw.scales(j).reshape(O, 1).cpu().clone()}
        item = {"weight": 1, "weight_scale": 2}
    else:
        make = {"weight_packed": lambda: pack_int32(qw.quantized(j)[0].cpu()),
                "weight_scale": lambda: qw.scales(j).cpu().contiguous(),
                "weight_shape": lambda: torch.tensor([O, I], dtype=torch.int64)}
        item = {"weight_packed": 4, "weight_scale": 2, "weight_shape": 8}
    return {names[p]: (math.prod(sizes[p]) * item[p], make[p]) for p in make}


def _targets(model: nn.Module, head: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every weight a scheme quantises: every Linear's and the routed experts' stacks, lm_head
    only if `head` (never when tied to the embedding). Matched by parameter name, not by importing the model's
    classes: quant.py sits below the model files."""
    out = []
    for name, p in model.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        is_linear = attr == "weight" and p.dim() == 2 and isinstance(model.get_submodule(owner_name), nn.Linear)
        is_experts = attr in ("w1", "w2", "w3") and p.dim() == 3
        if not (is_linear or is_experts) or (name == "head.weight" and not head):
            continue
        if name == "head.weight" and model.get_submodule("head").weight is model.get_submodule("embed").weight:
            continue
        out.append((name, p))
    return out


def default_group_size(model: nn.Module, head: bool) -> int:
    """int4's group size when none is asked for: 128 (the common choice), else the largest smaller one that divides
    every quantised weight's input dimension (small models have 64- or 96-wide inputs)."""
    dims = {p.shape[-1] for _, p in _targets(model, head)}
    fits = [g for g in GROUP_SIZES if g <= 128 and all(d % g == 0 for d in dims)]
    if not fits:
        raise ValueError(f"int4 needs input dimensions divisible by {GROUP_SIZES[0]}: this model has "
                         f"{sorted(d for d in dims if d % GROUP_SIZES[0])}; use int8")
    return max(fits)


def quantize_modules(model: nn.Module, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, QuantizedWeight]:
    """Put a QuantizedWeight (on the meta device) in place of every weight the scheme quantises (_targets).
    -> native name: weight."""
    out = {}
    for name, p in _targets(model, scheme.head):
        owner_name, _, attr = name.rpartition(".")
        if scheme.name == "int4" and p.shape[-1] % scheme.group_size:
            raise ValueError(f"int4 group_size={scheme.group_size} does not divide {name}'s input dimension "
                             f"{p.shape[-1]} (shape {list(p.shape)}): choose one of {GROUP_SIZES} that does")
        owner = model.get_submodule(owner_name)
        del owner._parameters[attr]
        qw = QuantizedWeight(scheme.name, tuple(p.shape), scheme.group_size, dtype)
        owner.add_module(attr, qw)
        out[name] = qw
    return out
