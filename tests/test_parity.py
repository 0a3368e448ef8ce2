"""openseek's logits and greedy continuations against transformers' DeepseekV2/V3ForCausalLM."""

from __future__ import annotations

import pytest
import torch

import openseek
from conftest import YARN, build_reference, save_reference, to_hub_config

CASES = {
    # name: (transformers class, config overrides, save_pretrained kwargs)
    "v2-lite-like: no q compression, yarn 0.707, greedy": ("v2", {}, {}),
    "q compression, yarn mscale 1.0, group-limited, scaling 16": (
        "v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                   routed_scaling_factor=16.0, rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}), {}),
    "plain rope, no yarn": ("v2", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), {}),
    "v3 noaux_tc, norm_topk_prob on, scaling 2.5, 2 dense layers": (
        "v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                   first_k_dense_replace=2, num_hidden_layers=4,
                   rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}), {}),
    "v3 noaux_tc, norm_topk_prob off, one shared expert": (
        "v3", dict(norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=1), {}),
    "sharded checkpoint": ("v2", dict(q_lora_rank=24), dict(max_shard_size="40KB")),
}


def reference_and_openseek(tmp_path, version, overrides, save_kwargs):
    ref = build_reference(version, **overrides)
    path = save_reference(ref, tmp_path / "ckpt", **save_kwargs)
    return ref, openseek.load_pretrained(path), path


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    version, overrides, save_kwargs = CASES[case]
    ref, model, path = reference_and_openseek(tmp_path, version, overrides, save_kwargs)
    if "shard" in case:
        assert len(list(path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == (2, 40, 256)
    assert expected.abs().max() > 1.0  # the check below is not trivially satisfied by tiny logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full recomputation: independent of any cache."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("version,overrides", [("v2", {}), ("v3", dict(q_lora_rank=24))])
def test_greedy_continuation_matches_transformers_generate(tmp_path, version, overrides):
    ref, model, _ = reference_and_openseek(tmp_path, version, overrides, {})
    prompt = torch.randint(2, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = greedy(model, prompt, 16)
    assert got.tolist() == expected.tolist()


def test_hub_style_config_loads_with_same_logits(tmp_path):
    ref, _, path = reference_and_openseek(tmp_path, "v2", dict(q_lora_rank=24), {})
    to_hub_config(path)
    model = openseek.load_pretrained(path)
    assert model.config.rope_scaling["mscale_all_dim"] == 0.707
    ids = torch.randint(0, 256, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_bfloat16_loads_and_runs(tmp_path):
    ref, model32, path = reference_and_openseek(tmp_path, "v3", {}, {})
    model = openseek.load_pretrained(path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.gate.weight.dtype == torch.float32  # the router stays float32
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        got, exact = model(ids), model32(ids)
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    # bf16 carries ~3 significant digits; logits track float32 closely, not exactly.
    assert (got.float() - exact).abs().max() < 0.1 * exact.abs().max()


@pytest.mark.parametrize("overrides", [{}, dict(v_head_dim=40)], ids=["v_narrower_than_qk", "v_wider_than_qk"])
def test_long_prompt_on_the_padded_flash_path_matches(tmp_path, overrides):
    from openseek.model import ops
    ref, model, _ = reference_and_openseek(tmp_path, "v2", overrides, {})
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    assert ids.shape[1] >= ops.FLASH_MIN_LEN
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
