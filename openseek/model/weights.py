"""Checkpoint I/O: the one Hugging Face name <-> openseek name map, sharded safetensors, fp8 block dequant.

Routed experts are stored per expert in the hub layout (`mlp.experts.{j}.gate_proj.weight`) and stacked in
openseek (`ffn.experts.w1[j]`). Loading reads one tensor at a time from memory-mapped files into a model
built on the meta device, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from .layers import Rotary
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


def hf_names(model: Transformer) -> dict[str, Slot]:
    """Every tensor name the hub layout has for this model, mapped to where it lives in openseek."""
    cfg, out = model.config, {}
    inv_layer = {v: k for k, v in LAYER_NAMES.items()}
    for hf, native in GLOBAL_NAMES.items():
        if not (native == "head.weight" and cfg.tie_word_embeddings):
            out[hf] = (native, None)
    for native in model.state_dict():
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

def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the folder's *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        for f in sorted(set(weight_map.values())):
            if not (path / f).is_file():
                raise FileNotFoundError(f"shard {f} listed in {index} is missing")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    out = {}
    for f in files:
        with _open(f) as st:
            out.update({name: f for name in st.keys()})
    return out


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, every shard inside the folder.

    A shard name is confined lexically (relative, no `..`), not by resolving it: the Hugging Face cache's
    snapshot folders are symlinks into its blobs folder, and a symlink is the folder owner's choice, while
    the index is downloaded data that once named `../../etc/passwd`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index (a JSON object with a weight_map): "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must be an object of tensor name -> shard file, "
                         f"not {type(weight_map).__name__}")
    for name, f in weight_map.items():
        if not isinstance(f, str):
            raise ValueError(f"{index}: weight_map[{name!r}]={f!r} must be a shard file name (a string)")
        if not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise ValueError(f"{index}: weight_map[{name!r}]={f!r} is not a file inside the model folder")
    return weight_map


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[i, j] * S[i // 128, j // 128] in float32 (DeepSeek-V3 block quantisation)."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


def _check(model: Transformer, files: dict[str, Path], expected: dict[str, Slot], with_mtp: bool) -> None:
    cfg, params = model.config, model.state_dict()
    missing = sorted(set(expected) - set(files))
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
                if name not in expected:
                    if not (is_mtp and (not with_mtp or m.group(2) in MTP_SHARED)) and \
                            not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        unexpected.append(name)
                    continue
                native, j = expected[name]
                want = tuple(params[native].shape[1:] if j is not None else params[native].shape)
                got = tuple(st.get_slice(name).get_shape())
                if got != want:
                    misshaped.append(f"{name} in {file.name}: shape {list(got)}, expected {list(want)}")
    problems = [f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"] if missing else []
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(sorted(misshaped)[:20]))
    if problems:
        raise ValueError("checkpoint does not match its config.json: " + " | ".join(problems))


def _materialize(model: Transformer, dtype: torch.dtype, device: torch.device) -> None:
    """Swap meta tensors for uninitialised ones of the target dtype (float32 for the router)."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        dt = torch.float32 if FP32_PARAMS.search(name) else dtype
        t = torch.empty(p.shape, dtype=dt, device=device)
        if isinstance(p, torch.nn.Parameter):
            owner._parameters[attr] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        else:
            owner._buffers[attr] = t
    model.rotary = Rotary(model.config).to(device)  # non-persistent, computed, not loaded
    if model.config.tie_word_embeddings:
        model.head.weight = model.embed.weight


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    mtp: bool = False) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 folder; `mtp=True` also loads V3's multi-token-prediction layers."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory")
    cfg = ModelConfig.from_file(path)
    files = checkpoint_files(path)
    dtype = dtype or _checkpoint_dtype(cfg)
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=mtp)
    expected = hf_names(model)
    _check(model, files, expected, mtp)
    _materialize(model, dtype, torch.device(device))
    block = tuple((cfg.quantization_config or {}).get("weight_block_size", (128, 128)))
    params = model.state_dict()
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        by_file[files[name]].append(name)
    handles: dict[Path, Any] = {}  # open files, for scales that sit in another shard (DeepSeek-V3#2)
    stack = contextlib.ExitStack()

    def read(name: str) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            handles[file] = stack.enter_context(_open(file))
        return handles[file].get_tensor(name)

    with stack, torch.no_grad():
        for file, names in by_file.items():
            for name in names:
                t = read(name)
                if (scale := name + FP8_SCALE_SUFFIX) in files:
                    t = dequantize_fp8(t, read(scale), block)
                native, j = expected[name]
                (params[native] if j is None else params[native][j]).copy_(t)
    # a copy: the weights are dequantised now, in `dtype`
    model.config = dataclasses.replace(cfg, quantization_config=None, torch_dtype=str(dtype).removeprefix("torch."))
    return model.eval()


def _checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.torch_dtype or "float32"
    dt = getattr(torch, name, None)
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


# ---- saving --------------------------------------------------------------------------------------

def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = 4 << 30) -> None:
    """Write config.json and safetensors shards (+ index when sharded) in the hub layout, one shard in memory
    at a time. huggingface_hub plans the shards by each tensor's own bytes: its torch planner would group the
    per-expert views of one stacked tensor into one shard, taking views of one storage for tied weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params, names = model.state_dict(), hf_names(model)

    def tensor(hf: str) -> torch.Tensor:
        native, j = names[hf]
        if j is None:
            return params[native].detach().to("cpu").contiguous()
        return params[native][j].detach().to("cpu").clone()  # one expert: safetensors refuses shared-storage views

    plan = split_state_dict_into_shards_factory(
        {hf: params[native] if j is None else params[native][j] for hf, (native, j) in names.items()},
        get_storage_size=lambda t: t.numel() * t.element_size(), filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    for fname, shard_names in plan.filename_to_tensors.items():
        save_file({hf: tensor(hf) for hf in shard_names}, path / fname, metadata={"format": "pt"})
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dataclasses.replace(model.config, torch_dtype=str(model.dtype).removeprefix("torch.")).save(path / "config.json")
