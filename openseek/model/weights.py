"""Checkpoint I/O: the one Hugging Face name <-> openseek name map, sharded safetensors, fp8 block dequant.

Routed experts are stored per expert in the hub layout (`mlp.experts.{j}.gate_proj.weight`) and stacked in
openseek (`ffn.experts.w1[j]`). Loading reads one tensor at a time (with pread, safetensors_io.py: a mapped file's
pages count as resident once read) into a model built on the meta device, so peak memory is the model plus one tensor;
quantised on load (int8, int4), the quantised model plus one float tensor and its quantisation's temporaries.
Quantised checkpoints use compressed-tensors' names (quant.py): `X.weight` + `X.weight_scale` (int8),
`X.weight_packed` + `X.weight_scale` + `X.weight_shape` (int4).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.torch import save_file

from ..config import ModelConfig
from . import quant
from .layers import Rotary
from .parallel import Layout, Reduce, shard
from .quant import QuantizedWeight, QuantScheme
from .safetensors_io import _open, _Shard, checkpoint_files
from .transformer import Transformer

GLOBAL_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "head.weight"}
LAYER_NAMES = {  # suffix after `model.layers.{i}.` -> suffix after `layers.{i}.`
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared.w3.weight",
}
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # mlp.experts.{j}.X.weight -> ffn.experts.W[j]
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
             "shared_head.norm.weight": "norm.weight"}
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main embedding / head
FP8_SCALE_SUFFIX = "_scale_inv"
FP32_PARAMS = re.compile(r"ffn\.gate\.(weight|bias)$")  # the router stays float32 at any model dtype

Slot = tuple[str, int | None]  # native parameter name, expert index into a stacked tensor (or None)
def native_names(model: Transformer) -> list[str]:
    """The state_dict's names, a QuantizedWeight's buffers counted once under the weight's own name."""
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    out: dict[str, None] = {}
    for name in model.state_dict():
        owner = name.rpartition(".")[0]
        out[owner if owner in quantized else name] = None
    return list(out)


def hf_names(model: Transformer) -> dict[str, Slot]:
    """Every tensor name the hub layout has for this model, mapped to where it lives in openseek."""
    cfg, out = model.config, {}
    inv_layer = {v: k for k, v in LAYER_NAMES.items()}
    for hf, native in GLOBAL_NAMES.items():
        if not (native == "head.weight" and cfg.tie_word_embeddings):
            out[hf] = (native, None)
    for native in native_names(model):
        m = re.fullmatch(r"(layers|mtp)\.(\d+)\.(.+)", native)
        if not m:
            continue
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        prefix = f"model.layers.{i if kind == 'layers' else cfg.num_hidden_layers + i}."
        if kind == "mtp":
            if rest.startswith("block."):
                rest = rest[len("block."):]
            else:
                out[prefix + {v: k for k, v in MTP_NAMES.items()}[rest]] = (native, None)
                continue
        if (e := re.fullmatch(r"ffn\.experts\.(w[123])", rest)):
            hf_proj = {v: k for k, v in EXPERT_NAMES.items()}[e.group(1)]
            for j in range(model.config.n_routed_experts):
                out[f"{prefix}mlp.experts.{j}.{hf_proj}.weight"] = (native, j)
        else:
            out[prefix + inv_layer[rest]] = (native, None)
    return out


# ---- loading -------------------------------------------------------------------------------------

def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[i, j] * S[i // 128, j // 128] in float32 (DeepSeek-V3 block quantisation)."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


def _check(cfg: ModelConfig, files: dict[str, Path], want: dict[str, tuple[int, ...]], with_mtp: bool) -> None:
    """Every tensor `want` names is in the files at its shape, and the files hold nothing else (MTP layers aside)."""
    missing = sorted(set(want) - set(files))
    unexpected, misshaped = [], []
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in files.items():
        by_file[file].append(name)
    for file, names in by_file.items():
        with _open(file) as st:  # headers only: one open per file
            for name in names:
                if name.endswith(FP8_SCALE_SUFFIX) and name[: -len(FP8_SCALE_SUFFIX)] in files:
                    continue
                m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
                is_mtp = bool(m) and int(m.group(1)) >= cfg.num_hidden_layers
                if name not in want:
                    if not (is_mtp and (not with_mtp or m.group(2) in MTP_SHARED)) and \
                            not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        unexpected.append(name)
                    continue
                got = tuple(st.get_slice(name).get_shape())
                if got != want[name]:
                    misshaped.append(f"{name} in {file.name}: shape {list(got)}, expected {list(want[name])}")
    problems = [f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"] if missing else []
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(sorted(misshaped)[:20]))
    if problems:
        raise ValueError("checkpoint does not match its config.json: " + " | ".join(problems))


def _stored_shapes(expected: dict[str, Slot], shapes: dict[str, tuple[int, ...]], stored: QuantScheme | None,
                   quantized: dict[str, QuantizedWeight]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape: a hub weight's own, or its parts' where the checkpoint is quantised."""
    want = {}
    for name, (native, _) in expected.items():
        if stored is not None and native in quantized:
            names = quant.part_names(name, stored)
            want.update({names[p]: s for p, s in quant.part_shapes(shapes[name], stored).items()})
        else:
            want[name] = shapes[name]
    return want


def _materialize(model: Transformer, dtype: torch.dtype, device: torch.device) -> None:
    """Swap meta tensors for uninitialised ones of the target dtype (float32 for the router); a QuantizedWeight's
    keep theirs, zeroed (int4's scales carry zero-points, 0 in a symmetric scheme)."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, QuantizedWeight):
            owner._buffers[attr] = torch.zeros(p.shape, dtype=p.dtype, device=device)
            continue
        dt = torch.float32 if FP32_PARAMS.search(name) else dtype
        t = torch.empty(p.shape, dtype=dt, device=device)
        if isinstance(p, torch.nn.Parameter):
            owner._parameters[attr] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        else:
            owner._buffers[attr] = t
    model.rotary = Rotary(model.config).to(device)  # non-persistent, computed, not loaded
    if model.config.tie_word_embeddings:
        model.head.weight = model.embed.weight


def _scheme(model: Transformer, stored: QuantScheme | None, quantization: str | None, group_size: int | None,
            quantize_head: bool) -> QuantScheme | None:
    """The scheme to load with: a quantised checkpoint's own (quantization may only repeat its name), else the
    one asked for (int4 without a group size: quant.default_group_size)."""
    if stored is not None:
        if quantization not in (None, stored.name):
            raise ValueError(f"quantization={quantization!r} is invalid for this checkpoint: it is stored as "
                             f"{stored.name} (load it with quantization={stored.name!r} or None)")
        return stored
    if quantization is None:
        return None
    if quantization == "int4" and group_size is None:
        group_size = quant.default_group_size(model, quantize_head)
    return QuantScheme(quantization, group_size if quantization == "int4" else None, quantize_head)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    mtp: bool = False, quantization: str | None = None, group_size: int | None = None,
                    quantize_head: bool = False, layout: Layout | None = None,
                    reduce: Reduce | None = None) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 folder; `mtp=True` also loads V3's multi-token-prediction layers.

    `quantization` "int8" or "int4" (groups of `group_size` inputs; None: 128 where it divides every input
    dimension, else the largest size that does) quantises every matmul weight as it is read,
    lm_head too if `quantize_head`; `dtype` is then the float type of the rest (embedding, norms) and of the
    activations. A compressed-tensors checkpoint (openseek convert --quantize) loads as it is stored.

    With a `layout` (parallel.py), the model is rank layout.rank's part, its partial sums joined by `reduce`, and
    only that part of each split tensor is read from the files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory")
    cfg = ModelConfig.from_file(path)
    stored = quant.scheme_of(cfg.quantization_config)
    files = checkpoint_files(path)
    dtype = dtype or _checkpoint_dtype(cfg)
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=mtp)
    expected = hf_names(model)
    params = model.state_dict()
    shapes = {name: tuple(params[n].shape[1:] if j is not None else params[n].shape)
              for name, (n, j) in expected.items()}
    full, parts = expected, {}
    if layout is not None and layout.size > 1:
        if stored is not None:
            raise ValueError(f"tensor_parallel_size={layout.size} is invalid for this checkpoint: it is stored "
                             f"quantised ({stored.name}), which loads on one device only")
        shard(model, layout, reduce)
        expected, parts = _local(layout, expected, shapes, cfg.n_routed_experts)
    scheme = _scheme(model, stored, quantization, group_size, quantize_head)
    qweights = quant.quantize_modules(model, scheme, dtype) if scheme else {}
    _check(cfg, files, _stored_shapes(full, shapes, stored, qweights), mtp)  # every tensor, whole
    _materialize(model, dtype, torch.device(device))
    _read_all(model, path, files, expected, qweights, stored, shapes, parts)
    model.config = dataclasses.replace(cfg, quantization_config=scheme.to_config() if scheme else None,
                                       torch_dtype=str(dtype).removeprefix("torch."))  # a copy: fp8 is dequantised
    return model.eval()


def _local(layout: Layout, expected: dict[str, Slot], shapes: dict[str, tuple[int, ...]], n_experts: int
           ) -> tuple[dict[str, Slot], dict[str, tuple[int, int, int]]]:
    """The checkpoint tensors rank layout.rank reads, each at its index in this rank's expert stack, and the
    (dim, start, stop) part it reads of those it splits."""
    local, parts = {}, {}
    for name, (native, j) in expected.items():
        k = layout.local_expert(native, j, n_experts)
        if k == -1:
            continue  # another rank's expert
        local[name] = (native, k)
        if (part := layout.hub_part(native, j, shapes[name])) is not None:
            parts[name] = part
    return local, parts


def _read_all(model: Transformer, path: Path, files: dict[str, Path], expected: dict[str, Slot],
              qweights: dict[str, QuantizedWeight], stored: QuantScheme | None,
              shapes: dict[str, tuple[int, ...]], parts: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Copy, dequantise (fp8) or quantise every tensor into the materialised model, one tensor at a time; of a
    tensor in `parts`, only that (dim, start, stop) part."""
    qc = model.config.quantization_config or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    params = model.state_dict()
    is_stored = {name: stored is not None and native in qweights for name, (native, _) in expected.items()}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        first = next(iter(quant.part_names(name, stored).values())) if is_stored[name] else name
        by_file[files[first]].append(name)
    handles: dict[Path, Any] = {}  # open files, for scales that sit in another shard (DeepSeek-V3#2)

    def read(name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            handles[file] = _Shard(file)
        return handles[file].get_tensor(name, part)

    def close() -> None:
        while handles:
            handles.popitem()[1].close()

    with torch.no_grad():
        try:
            for names in by_file.values():
                for name in names:
                    native, j = expected[name]
                    if is_stored[name]:
                        qweights[native].set_quantized(*quant.read_parts(read, name, stored, shapes[name]), index=j)
                        continue
                    part = (parts or {}).get(name)
                    if (scale := name + FP8_SCALE_SUFFIX) in files:  # scale blocks need not align with a part
                        t = dequantize_fp8(read(name), read(scale), block)
                        t = t if part is None else t.narrow(part[0], part[1], part[2] - part[1])
                    else:
                        t = read(name, part)
                    if native in qweights:
                        qweights[native].set(t.to(model.device), j)
                    else:
                        (params[native] if j is None else params[native][j]).copy_(t)
        finally:
            close()


def _checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.torch_dtype or "float32"
    dt = getattr(torch, name, None)
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


# ---- saving --------------------------------------------------------------------------------------

def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = 4 << 30) -> None:
    """Write config.json and safetensors shards (+ index when sharded) in the hub layout, one shard in memory
    at a time; a quantised model in compressed-tensors' layout, its scheme in config.json. huggingface_hub plans
    the shards by each tensor's own bytes: its torch planner would group the per-expert views of one stacked
    tensor into one shard, taking views of one storage for tied weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params, names = model.state_dict(), hf_names(model)
    qweights = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    scheme = quant.scheme_of(model.config.quantization_config) if qweights else None
    entries: dict[str, tuple[int, Callable[[], torch.Tensor]]] = {}  # tensor name -> (bytes, its tensor on demand)
    for hf, (native, j) in names.items():
        if native in qweights:
            entries.update(quant.checkpoint_parts(hf, qweights[native], j, scheme))
            continue
        t = params[native] if j is None else params[native][j]
        # one expert cloned: safetensors refuses shared-storage views
        entries[hf] = (t.numel() * t.element_size(), lambda t=t, j=j: t.detach().to("cpu").contiguous()
                       if j is None else t.detach().to("cpu").clone())
    plan = split_state_dict_into_shards_factory(
        {name: size for name, (size, _) in entries.items()}, get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    for fname, shard_names in plan.filename_to_tensors.items():
        save_file({name: entries[name][1]() for name in shard_names}, path / fname, metadata={"format": "pt"})
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch.")).save(path / "config.json")
