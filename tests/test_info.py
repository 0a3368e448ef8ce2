"""`openseek info`: parameter counts and KV-cache sizes against hand-computed figures, and the CLI's behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from openseek import ModelConfig, Transformer, preset
from openseek.cli import main
from openseek.summary import count_parameters, kv_cache, summarize

# Reference §4.3 / §1.5 / §8.1, derived by hand from the configs: (total, activated incl. embedding and head,
# activated excl. input embedding) in B; per-layer attention and one routed expert in M (None: not given).
REFERENCE = {
    "v2": dict(total=235.74, activated=21.38, excl=20.85, attention=149.2, expert=23.6),
    "v2-lite": dict(total=15.71, activated=2.66, excl=2.45, attention=None, expert=None),
    "v3": dict(total=671.03, activated=37.55, excl=None, attention=187.1, expert=44.0),
}
CACHE = {  # layers, latent values/token (all layers), expanded values/token/layer, ratio
    "v2": (60, 34_560, 40_960, 71.1),
    "v2-lite": (27, 15_552, 5_120, 8.9),
    "v3": (61, 35_136, 40_960, 71.1),
}


@lru_cache(maxsize=None)
def counts(name: str):
    return count_parameters(preset(name))


@pytest.mark.parametrize("name", list(REFERENCE))
def test_preset_parameter_counts_match_hand_computed_figures(name):
    ref, c = REFERENCE[name], counts(name)
    assert c.total / 1e9 == pytest.approx(ref["total"], abs=0.01)
    assert c.activated / 1e9 == pytest.approx(ref["activated"], abs=0.01)
    if ref["excl"] is not None:
        assert c.activated_excl_embedding / 1e9 == pytest.approx(ref["excl"], abs=0.01)
    if ref["attention"] is not None:
        assert c.attention_per_layer / 1e6 == pytest.approx(ref["attention"], abs=0.05)
        assert c.routed_expert / 1e6 == pytest.approx(ref["expert"], abs=0.05)


def test_v3_mtp_layer_is_counted_apart_from_the_main_model():
    D, Q, H, C, E, F = 7168, 1536, 128, 512, 256, 2048
    attention = D * Q + Q + Q * H * 192 + D * (C + 64) + C + C * H * (128 + 128) + H * 128 * D  # + q/kv norms
    moe = E * D + (E + 1) * 3 * D * F  # router, 256 routed + 1 shared expert
    mtp = 2 * D * D + 3 * D + attention + 2 * D + moe  # eh_proj, enorm/hnorm/norm, the block with its 2 norms
    c = counts("v3")
    assert c.mtp == mtp  # 11.61B; §4.3 quotes ~11.5B unique, and 671B + MTP stays under the 685B on disk
    assert c.total + c.mtp < 685e9


@pytest.mark.parametrize("name", list(CACHE))
def test_kv_cache_sizes_match_reference(name):
    layers, latent_per_token, expanded_per_layer, ratio = CACHE[name]
    kv = kv_cache(preset(name))
    assert kv.latent_per_layer == 576
    assert kv.latent_per_token == latent_per_token == 576 * layers
    assert kv.expanded_per_layer == expanded_per_layer
    assert kv.ratio == pytest.approx(ratio, abs=0.05)
    assert kv.to_dict()["latent_bytes_per_token"] == 2 * latent_per_token  # bf16 by default
    assert kv_cache(preset(name), "fp8").to_dict()["expanded_bytes_per_token"] == layers * expanded_per_layer


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)


@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=12), dict(tie_word_embeddings=True),
                                       dict(n_routed_experts=None)], ids=["lite-like", "q_lora", "tied", "dense"])
def test_counts_equal_numel_of_a_real_model(overrides):
    cfg = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg)  # real tensors on CPU
    c = count_parameters(cfg)
    assert c.total == sum(p.numel() for p in model.parameters())
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # w1, w2, w3 of one SwiGLU expert
    E = cfg.n_routed_experts or 0
    assert c.routed_experts == n_moe * E * expert
    assert c.activated == c.total - n_moe * (E - cfg.num_experts_per_tok) * expert
    embedding = cfg.vocab_size * cfg.hidden_size
    assert c.activated_excl_embedding == c.activated - (0 if cfg.tie_word_embeddings else embedding)


def test_info_on_a_checkpoint_counts_what_transformers_builds(tmp_path, capsys):
    from conftest import build_reference, save_reference

    ref = build_reference("v2")
    path = save_reference(ref, tmp_path / "ckpt")
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == {"path": str(path)}
    assert data["parameters"]["total"] == sum(p.numel() for p in ref.parameters())


def test_python_m_openseek_info_prints_the_v2_summary():
    r = subprocess.run([sys.executable, "-m", "openseek", "info", "--preset", "v2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for fact in ("deepseek_v2", "60 (1 dense + 59 MoE)", "160 routed + 2 shared, 6 active", "group_limited_greedy",
                 "softmax", "factor 40", "0.114721", "235.74B", "21.38B", "20.85B", "576", "34,560", "40,960",
                 "67.5 KiB", "71.1x"):
        assert fact in out, f"{fact!r} missing from:\n{out}"


def test_json_output_carries_the_summary(capsys):
    assert main(["info", "--preset", "v2-lite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == {"preset": "v2-lite"}
    assert data["parameters"]["total"] == counts("v2-lite").total
    assert data["kv_cache"]["latent_per_token"] == 15_552
    assert data["architecture"]["q_lora_rank"] is None
    assert {k: v for k, v in data.items() if k != "source"} == summarize(preset("v2-lite"))


def test_unknown_preset_exits_2_naming_it_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "openseek", "info", "--preset", "v9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "'v9'" in r.stderr and "v2-lite" in r.stderr


@pytest.mark.parametrize("case", ["missing path", "folder without config.json", "bad json", "invalid field",
                                  "path and preset", "neither"])
def test_bad_input_exits_2_with_one_line_naming_the_problem(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "invalid").mkdir()
    (tmp_path / "invalid" / "config.json").write_text(json.dumps({"num_attention_heads": 0}))
    argv, expect = {
        "missing path": ([str(tmp_path / "nowhere")], "nowhere"),
        "folder without config.json": ([str(tmp_path / "empty")], "config.json"),
        "bad json": ([str(tmp_path / "bad")], "not valid JSON"),
        "invalid field": ([str(tmp_path / "invalid")], "num_attention_heads"),
        "path and preset": ([str(tmp_path / "bad"), "--preset", "v2"], "exactly one"),
        "neither": ([], "exactly one"),
    }[case]
    assert main(["info", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert expect in captured.err


def test_unknown_cache_dtype_names_the_field():
    from openseek.config import preset
    from openseek.summary import kv_cache
    from openseek.validation import FieldError

    with pytest.raises(FieldError, match="cache_dtype='int3'.*bf16") as e:
        kv_cache(preset("v2-lite"), "int3")
    assert e.value.field == "cache_dtype"
