"""`EngineConfig`: the one place for the engine's defaults and their validation; the CLI's flags come from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.quant import GROUP_SIZES as QUANT_GROUP_SIZES
from ..model.quant import SCHEMES as QUANT_SCHEMES
from ..validation import check, is_int

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(slots=True)
class EngineConfig:
    """Engine settings; names and defaults follow vLLM's engine arguments where they overlap."""

    dtype: str | torch.dtype | None = field(default=None, metadata=_help(
        "weights and cache: float32, bfloat16, float16 or auto (the checkpoint's)"))
    device: str = field(default="cpu", metadata=_help("torch device of the model and its cache"))
    max_num_seqs: int = field(default=64, metadata=_help("sequences generated at once"))
    max_model_len: int | None = field(default=None, metadata=_help(
        "context length, prompt + completion (default: the model's, at most 8192)"))
    kv_cache_memory: int | None = field(default=None, metadata=_help(
        "bytes of latent cache (default: max_num_seqs full contexts, at most 1 GiB)"))
    block_size: int = field(default=16, metadata=_help("tokens per cache block"))
    max_num_batched_tokens: int = field(default=2048, metadata=_help("tokens computed per step"))
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse the cache of shared prompt prefixes"))
    seed: int = field(default=0, metadata=_help("seeds the draws of requests that give no seed"))
    max_waiting: int = field(default=256, metadata=_help("queued sequences before new requests are refused"))
    quantization: str | None = field(default=None, metadata=_help(
        "weight-only quantisation on load: int8 (per output channel) or int4 (groups of quantization_group_size "
        "inputs); a quantised checkpoint loads as stored"))
    quantization_group_size: int | None = field(default=None, metadata=_help(
        "int4: input columns per scale, 32, 64, 128 or 256, dividing every weight's input dimension "
        "(default: 128, or the largest smaller size that divides them all)"))
    compile: bool = field(default=False, metadata=_help(
        "run decode steps as a torch.compile graph (inductor; needs a C++ compiler on CPU; the first steps of each "
        "batch shape compile for tens of seconds); eager, with a logged reason, where compilation fails"))
    tensor_parallel_size: int = field(default=1, metadata=_help(
        "processes the model is split over (attention heads, dense FFNs, shared experts; routed experts too, by "
        "their hidden dim or, with enable_expert_parallel, whole); started by openseek on this machine, or by torchrun"))
    data_parallel_size: int = field(default=1, metadata=_help(
        "groups of tensor_parallel_size processes that each attend over, and cache, their own sequences; the "
        "FFNs and experts split over all tensor_parallel_size x data_parallel_size processes"))
    enable_expert_parallel: bool = field(default=False, metadata=_help(
        "split the routed experts whole over the tensor_parallel_size x data_parallel_size processes"))
    distributed_timeout: int = field(default=60, metadata=_help(
        "seconds a collective between the processes may wait before the engine declares a worker lost"))

    def __post_init__(self) -> None:
        own = "config field "
        if isinstance(self.dtype, str):
            check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {', '.join(DTYPES)}", own)
            self.dtype = DTYPES[self.dtype]
        check(self.dtype is None or isinstance(self.dtype, torch.dtype), "dtype", self.dtype,
              "must be a torch.dtype, a dtype name or None", own)
        check(isinstance(self.device, str) and bool(self.device), "device", self.device, "must be a device name", own)
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_waiting", "tensor_parallel_size",
                     "data_parallel_size", "distributed_timeout"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "must be a positive integer", own)
        for name in ("max_model_len", "kv_cache_memory"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value >= 1), name, value, "must be a positive integer or None",
                  own)
        check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", self.enable_prefix_caching,
              "must be a bool", own)
        check(isinstance(self.compile, bool), "compile", self.compile, "must be a bool", own)
        check(isinstance(self.enable_expert_parallel, bool), "enable_expert_parallel", self.enable_expert_parallel,
              "must be a bool", own)
        check(self.world_size == 1 or not self.compile, "compile", self.compile, "is not supported with "
              "more than one process (a compiled graph would break at every all-reduce)", own)
        check(is_int(self.seed), "seed", self.seed, "must be an integer", own)
        check(self.quantization in (None, *QUANT_SCHEMES), "quantization", self.quantization,
              f"must be one of {', '.join(QUANT_SCHEMES)} or None", own)
        check(self.quantization_group_size is None or self.quantization_group_size in QUANT_GROUP_SIZES,
              "quantization_group_size", self.quantization_group_size,
              f"must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, or None", own)

    @property
    def world_size(self) -> int:
        """Processes serving the model."""
        return self.tensor_parallel_size * self.data_parallel_size

    def model_len(self, max_position_embeddings: int) -> int:
        """max_model_len, or its default: the model's context, at most 8192 tokens."""
        return self.max_model_len or min(max_position_embeddings, 8192)

    def cache_memory(self, max_model_len: int, bytes_per_token: int) -> int:
        """kv_cache_memory, or its default: max_num_seqs full contexts in whole blocks, at most 1 GiB."""
        blocks = -(-max_model_len // self.block_size)  # a context's last block is a whole one
        return self.kv_cache_memory or min(1 << 30, self.max_num_seqs * blocks * self.block_size * bytes_per_token)
