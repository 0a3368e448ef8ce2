"""Tiny random DeepSeek checkpoints written by transformers itself: the independent reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

# Subprocesses (the CLI, torchrun workers, servers) run single-threaded too; set before any of them starts.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread per test: tiny models gain nothing from two, and two teams fight over 2 cores. A test
    that measures threading sets its own count; the previous one is restored after every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
            first_k_dense_replace=1, max_position_embeddings=4096, rope_parameters=YARN, bos_token_id=0,
            eos_token_id=1, pad_token_id=None)


def build_reference(version: str = "v2", seed: int = 0, **overrides):
    """A transformers DeepseekV2/V3ForCausalLM with random weights large enough to make routing matter."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    kw = {**TINY, **overrides}
    if version == "v2":
        model_cls, cfg = DeepseekV2ForCausalLM, DeepseekV2Config(**kw)
    else:
        kw.setdefault("n_group", 2)
        kw.setdefault("topk_group", 1)
        model_cls, cfg = DeepseekV3ForCausalLM, DeepseekV3Config(**kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)  # unit-variance outputs per layer
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))
    return model


def save_reference(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def to_hub_config(path: Path) -> None:
    """Rewrite config.json the way the hub ships it: rope_theta + rope_scaling{type: yarn}, no rope_parameters."""
    d = json.loads((path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    if rope.pop("rope_type") == "yarn":
        d["rope_scaling"] = {"type": "yarn", **rope}
    for k in ("head_dim", "qk_head_dim", "dtype", "transformers_version", "output_router_logits"):
        d.pop(k, None)
    d.update(torch_dtype="float32", ep_size=1, aux_loss_alpha=0.001, seq_aux=True, scoring_func="softmax",
             auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"})
    (path / "config.json").write_text(json.dumps(d, indent=2))


@pytest.fixture
def tiny_v2(tmp_path) -> Path:
    return save_reference(build_reference("v2"), tmp_path / "v2")


def build_tiny_folder(path: Path):
    """A tiny V2 checkpoint with a byte-level BPE tokenizer and V2-Chat's template: (folder, reference model)."""
    from tokenizers_util import write_test_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_test_tokenizer(path)
    ref = build_reference("v2", q_lora_rank=24, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    save_reference(ref, path)
    return path, ref


TRAIN_TEXT = ["def add(a, b):\n    return a + b\n" * 40, "class Point:\n    x: int\n    y: int\n" * 40,
              "The quick brown fox jumps over the lazy dog.\n" * 60, "for i in range(10):\n    print(i)\n" * 50,
              "import os\nimport sys\n\nprint(os.getcwd())\n" * 40]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few small text files: a training corpus that tokenizes and packs in a second."""
    root = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TRAIN_TEXT):
        (root / f"doc{i}.py").write_text(t)
    return root


def first_new_substring(text: str, width: int = 2) -> int | None:
    """An index k >= 1 where text[k:k+width] is clean text that does not occur earlier: a usable stop string."""
    for k in range(1, len(text) - width):
        piece = text[k:k + width]
        if "\ufffd" not in piece and text.find(piece) == k:
            return k
    return None
