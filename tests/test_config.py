"""ModelConfig: both config.json dialects, write-back, and errors naming the field."""

from __future__ import annotations

import json

import pytest

from openseek.config import ModelConfig, preset
from openseek.validation import FieldError

HUB_V2 = {  # DeepSeek-V2's config.json as shipped on the hub (reference §4.1), trimmed of non-architecture keys
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 160,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "scoring_func": "softmax",
    "norm_topk_prob": False, "routed_scaling_factor": 16.0, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "hidden_act": "silu", "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001, "aux_loss_alpha": 0.001,
    "seq_aux": True, "ep_size": 1, "pretraining_tp": 1, "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
}


def test_hub_config_equals_preset_and_keeps_unknown_keys():
    cfg = ModelConfig.from_hf(HUB_V2)
    ref = preset("v2")
    for field in ("hidden_size", "q_lora_rank", "n_group", "topk_group", "routed_scaling_factor", "rope_scaling"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.extra["auto_map"] == HUB_V2["auto_map"]
    # reference §9: 192^-1/2 * mscale(40, 0.707)^2
    assert cfg.softmax_scale == pytest.approx(0.114721, abs=1e-6)


def test_transformers_rope_parameters_dialect_is_the_same_config():
    d = dict(HUB_V2)
    ys = dict(d.pop("rope_scaling"))
    ys.pop("type")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **ys}
    assert ModelConfig.from_hf(d).to_hf() == ModelConfig.from_hf(HUB_V2).to_hf()


def test_write_back_round_trips(tmp_path):
    cfg = ModelConfig.from_hf(HUB_V2)
    cfg.save(tmp_path / "config.json")
    again = ModelConfig.from_file(tmp_path)
    assert again == cfg
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"]["type"] == "yarn" and written["rope_parameters"]["rope_type"] == "yarn"


def test_gready_spelling_is_greedy():
    assert ModelConfig.from_hf({**HUB_V2, "topk_method": "gready"}).topk_method == "greedy"


def test_v3_config_without_router_keys_gets_v3_routing():
    d = {k: v for k, v in HUB_V2.items() if k not in ("topk_method", "scoring_func")}
    cfg = ModelConfig.from_hf({**d, "model_type": "deepseek_v3", "n_routed_experts": 256, "topk_group": 4})
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")


def test_q_lora_rank_null_and_dense_model():
    cfg = ModelConfig.from_hf({**HUB_V2, "q_lora_rank": None, "n_routed_experts": None})
    assert cfg.q_lora_rank is None and not any(cfg.is_moe_layer(i) for i in range(60))


def test_moe_layer_freq_and_first_dense():
    cfg = ModelConfig.from_hf({**HUB_V2, "first_k_dense_replace": 3, "moe_layer_freq": 2})
    assert [i for i in range(8) if cfg.is_moe_layer(i)] == [4, 6]


@pytest.mark.parametrize("field,value,message", [
    ("topk_method", "random", "topk_method='random'.*greedy, group_limited_greedy, noaux_tc"),
    ("scoring_func", "tanh", "scoring_func='tanh'.*softmax, sigmoid"),
    ("n_group", 7, "n_group=7.*divide n_routed_experts=160"),
    ("topk_group", 9, r"topk_group=9.*\[1, n_group=8\]"),
    ("num_experts_per_tok", 200, "num_experts_per_tok=200"),
    ("hidden_act", "gelu", "hidden_act='gelu'.*silu"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim=63.*even"),
    ("model_type", "llama", "model_type='llama'"),
    ("moe_layer_freq", 0, "moe_layer_freq=0"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(FieldError, match=message) as e:
        ModelConfig.from_hf({**HUB_V2, field: value})
    assert e.value.field == field


def test_noaux_tc_needs_sigmoid_and_unknown_rope_type():
    with pytest.raises(ValueError, match="noaux_tc.*sigmoid"):
        ModelConfig.from_hf({**HUB_V2, "topk_method": "noaux_tc"})
    with pytest.raises(FieldError, match=r"rope_scaling\.type='linear'") as e:
        ModelConfig.from_hf({**HUB_V2, "rope_scaling": {"type": "linear", "factor": 2}})
    assert e.value.field == "rope_scaling.type"


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_file(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("max_position_embeddings", 0, r"max_position_embeddings=0.*\[2, "),
    ("num_hidden_layers", 1_000_000_000, r"num_hidden_layers=1000000000.*\[1, 1024\]"),
    ("num_hidden_layers", 1e9, r"num_hidden_layers=1000000000\.0.*integer"),  # JSON's 1e9 is a float
    ("hidden_size", 64.0, "hidden_size=64.0.*integer"),
    ("vocab_size", 1 << 30, "vocab_size="),
    ("n_routed_experts", 0, "n_routed_experts=0.*or null"),
    ("q_lora_rank", 0, "q_lora_rank=0.*or null"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps=-1e-06.*positive"),
    ("rope_theta", "big", "rope_theta='big'.*positive"),
    ("rope_scaling", ["yarn"], "rope_scaling=.*object"),
])
def test_sizes_out_of_bounds_name_the_field(field, value, message):
    with pytest.raises(FieldError, match=message) as e:
        ModelConfig.from_hf({**HUB_V2, field: value})
    assert e.value.field == field


def test_huge_config_file_fails_fast_before_building(tmp_path):
    """A config.json of a billion layers used to be accepted; the loader then built them on the meta device."""
    import time

    from openseek.model import load_pretrained

    (tmp_path / "config.json").write_text(json.dumps({**HUB_V2, "num_hidden_layers": 1_000_000_000}))
    t0 = time.perf_counter()
    with pytest.raises(FieldError, match="num_hidden_layers") as e:
        load_pretrained(tmp_path)
    assert e.value.field == "num_hidden_layers" and time.perf_counter() - t0 < 1.0


def test_parameter_count_over_the_bound_is_refused():
    # every size within its own bound, but 59 MoE layers of 64 Ki experts of width 2^20: 59 * 2^16 * 3 * 5120 * 2^20
    with pytest.raises(ValueError, match=r"config implies 6\.2\de\+16 parameters.*1e\+13") as e:
        ModelConfig.from_hf({**HUB_V2, "n_routed_experts": 1 << 16, "moe_intermediate_size": 1 << 20})
    assert not isinstance(e.value, FieldError)


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"tie_word_embeddings": True},
                                     {"n_routed_experts": None}, {"n_shared_experts": 0, "moe_layer_freq": 2},
                                     {"model_type": "deepseek_v3", "topk_method": "noaux_tc",
                                      "scoring_func": "sigmoid", "num_nextn_predict_layers": 1}])
def test_parameter_formula_equals_the_built_modules(changes):
    from openseek.summary import count_parameters

    cfg = ModelConfig.from_hf({**HUB_V2, "num_hidden_layers": 4, **changes})
    assert cfg.num_parameters() == count_parameters(cfg).total


@pytest.mark.parametrize("text,kind", [("[1, 2]", "an array"), ("42", "a number"), ("null", "null")])
def test_config_json_that_is_not_an_object_names_the_file(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"config.json holds {kind}: a config.json is a JSON object"):
        ModelConfig.from_file(tmp_path)
