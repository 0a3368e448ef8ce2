"""Checkpoint round trips, fp8 block dequantisation, and clear errors on bad checkpoints."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import openseek
from openseek.config import ModelConfig
from conftest import build_reference, save_reference


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_transformers_loads_what_openseek_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = build_reference("v3", q_lora_rank=24)
    model = openseek.load_pretrained(save_reference(ref, tmp_path / "a"))
    openseek.save_pretrained(model, tmp_path / "b", max_shard_size=50_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_transformers_openseek_save_reload_gives_identical_tensors(tmp_path):
    src = save_reference(build_reference("v2", q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                         topk_group=2), tmp_path / "hf")
    openseek.save_pretrained(openseek.load_pretrained(src), tmp_path / "os")
    a, b = read_all(src), read_all(tmp_path / "os")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    reloaded = openseek.load_pretrained(tmp_path / "os")
    assert reloaded.config.to_hf() == openseek.load_pretrained(src).config.to_hf()


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block absmax scaling to float8_e4m3fn, as DeepSeek-V3 ships its weights."""
    M, N = w.shape
    bm, bn = math.ceil(M / block), math.ceil(N / block)
    padded = torch.zeros(bm * block, bn * block)
    padded[:M, :N] = w
    blocks = padded.view(bm, block, bn, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (bm, bn)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(bm * block, bn * block)[:M, :N]
    return q.contiguous(), scale


def test_fp8_checkpoint_matches_dequantised_reference(tmp_path):
    # hidden 192 and a 576-wide kv_a: weights span several 128-blocks, with partial edge blocks.
    ref = build_reference("v3", hidden_size=192, q_lora_rank=160, kv_lora_rank=136, moe_intermediate_size=64,
                          intermediate_size=200)
    path = save_reference(ref, tmp_path / "fp8")
    tensors = load_file(path / "model.safetensors")
    proj = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shard_a, shard_b, dequantised = {}, {}, {}
    for name, t in tensors.items():
        if any(f".{p}.weight" in name for p in proj):
            q, s = quantize_fp8(t)
            shard_a[name] = q
            shard_b[name + "_scale_inv"] = s  # scales in another shard, as in DeepSeek-V3's release
            s_full = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            dequantised[name] = q.float() * s_full
        else:
            shard_a[name] = t
    (path / "model.safetensors").unlink()
    save_file(shard_a, path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(shard_b, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(shard_a, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(shard_b, "model-00002-of-00002.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))

    model = openseek.load_pretrained(path)
    sd = {k: v for k, v in tensors.items()}
    sd.update(dequantised)
    # transformers holds experts fused; load the dequantised hub tensors through its own loader.
    ref_dq = build_reference("v3", hidden_size=192, q_lora_rank=160, kv_lora_rank=136, moe_intermediate_size=64,
                             intermediate_size=200)
    save_file(sd, tmp_path / "dq.safetensors")
    (tmp_path / "dq").mkdir()
    (tmp_path / "dq.safetensors").rename(tmp_path / "dq" / "model.safetensors")
    ref_dq.config.save_pretrained(tmp_path / "dq")
    from transformers import AutoModelForCausalLM
    ref_dq = AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        expected, original = ref_dq(ids).logits, ref(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (expected - original).abs().max() > 1e-4  # quantisation really changed the weights
    assert model.config.quantization_config is None


def test_checkpoint_io_changes_no_config_it_was_handed(tmp_path, monkeypatch):
    """load_pretrained's model gets a copy (quantisation dropped, dtype set); save_pretrained writes a copy."""
    path = save_reference(build_reference("v2"), tmp_path / "a")
    shared = ModelConfig.from_file(path)
    shared.quantization_config = {"weight_block_size": [128, 128]}  # as an fp8 checkpoint's config reads
    before = copy.deepcopy(shared)
    monkeypatch.setattr(ModelConfig, "from_file", classmethod(lambda cls, p: shared))
    model = openseek.load_pretrained(path, dtype=torch.bfloat16)
    assert shared == before
    assert model.config.torch_dtype == "bfloat16" and model.config.quantization_config is None
    model.config.torch_dtype = "float32"  # stale on purpose: the saved file must say what the weights are
    openseek.save_pretrained(model, tmp_path / "b")
    assert model.config.torch_dtype == "float32"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_shards_split_a_stacked_expert_tensor_and_respect_the_size(tmp_path):
    """Per-expert views of one stacked tensor go to shards one by one, like any tensor: no shard holds more
    than max_shard_size unless a single tensor is larger; transformers reads them back (test above)."""
    model = openseek.load_pretrained(save_reference(build_reference("v2"), tmp_path / "a"))
    limit = 30_000
    openseek.save_pretrained(model, tmp_path / "b", max_shard_size=limit)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    files = sorted((tmp_path / "b").glob("model-*.safetensors"))
    assert {f.name for f in files} == set(index["weight_map"].values()) and len(files) > 2
    expert_files = {f for name, f in index["weight_map"].items() if ".mlp.experts." in name and "gate_proj" in name
                    and name.startswith("model.layers.1.")}
    assert len(expert_files) > 1  # layer 1's gate_proj experts span shards
    total = 0
    for f in files:
        shard = load_file(f)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= limit or len(shard) == 1, f.name
        total += size
    assert index["metadata"]["total_size"] == total


# ---- bad inputs ----------------------------------------------------------------------------------

def test_missing_shard_is_named(tmp_path):
    path = save_reference(build_reference("v2"), tmp_path / "c", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        openseek.load_pretrained(path)


def _sharded_with_a_shard_outside(tmp_path):
    """A sharded checkpoint whose second shard moved out of the folder, to tmp_path/outside."""
    path = save_reference(build_reference("v2"), tmp_path / "c", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    (tmp_path / "outside").mkdir()
    moved = victim.rename(tmp_path / "outside" / victim.name)
    return path, victim.name, moved


@pytest.mark.parametrize("spell", [lambda name, moved: f"../outside/{name}", lambda name, moved: str(moved)],
                         ids=["dot-dot", "absolute"])
def test_shard_paths_outside_the_folder_are_refused(tmp_path, spell):
    """The index once named ../../etc/passwd and it was opened; here it names a real shard outside the folder,
    which the old loader read."""
    path, name, moved = _sharded_with_a_shard_outside(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: spell(name, moved) if f == name else f for k, f in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map\[.*\]=.*is not a file inside the model folder"):
        openseek.load_pretrained(path)


def test_shard_symlinked_from_inside_the_folder_loads(tmp_path):
    """The Hugging Face cache's snapshot folders hold symlinks into its blobs folder: those stay loadable."""
    path, name, moved = _sharded_with_a_shard_outside(tmp_path)
    (path / name).symlink_to(moved)
    ref = openseek.load_pretrained(save_reference(build_reference("v2"), tmp_path / "d"))
    got = openseek.load_pretrained(path)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("index,message", [
    ("[]", "not a valid safetensors index"), ("{}", "not a valid safetensors index"), ("{not json", "not a valid"),
    ('{"weight_map": ["model.safetensors"]}', "weight_map must be an object"),
    ('{"weight_map": {"lm_head.weight": 3}}', r"weight_map\['lm_head.weight'\]=3 must be a shard file name"),
])
def test_invalid_index_is_a_value_error_naming_it(tiny_v2, index, message):
    (tiny_v2 / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json.*{message}"):
        openseek.load_pretrained(tiny_v2)


def test_truncated_safetensors_is_named(tmp_path, tiny_v2):
    f = tiny_v2 / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        openseek.load_pretrained(tiny_v2)


def test_wrong_shape_is_named(tiny_v2):
    f = tiny_v2 / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(5, 5)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight.*\[5, 5\]"):
        openseek.load_pretrained(tiny_v2)


def test_missing_and_unexpected_tensors_are_named(tiny_v2):
    f = tiny_v2 / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    sd["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(4)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"missing.*experts\.5\.up_proj.*unexpected.*rotary\.inv_freq"):
        openseek.load_pretrained(tiny_v2)


def test_unknown_topk_method_is_named(tiny_v2):
    cfg = json.loads((tiny_v2 / "config.json").read_text())
    cfg["topk_method"] = "random"
    (tiny_v2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="topk_method='random'.*greedy"):
        openseek.load_pretrained(tiny_v2)


def test_missing_folder_and_weights(tmp_path, tiny_v2):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        openseek.load_pretrained(tmp_path / "nowhere")
    (tiny_v2 / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        openseek.load_pretrained(tiny_v2)


def test_mtp_layer_skipped_unless_asked(tmp_path):
    ref = build_reference("v3", num_nextn_predict_layers=1)
    path = save_reference(ref, tmp_path / "mtp")
    sd = load_file(path / "model.safetensors")
    L, D = 3, 64
    extra = {f"model.layers.{L}.{n}": torch.randn(D) for n in ("enorm.weight", "hnorm.weight",
                                                             "shared_head.norm.weight")}
    extra[f"model.layers.{L}.eh_proj.weight"] = torch.randn(D, 2 * D)
    extra[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    extra[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    for name, t in sd.items():  # the MTP block has the shape of a main MoE layer
        if name.startswith("model.layers.2."):
            extra[name.replace("layers.2.", f"layers.{L}.")] = torch.randn_like(t)
    save_file({**sd, **extra}, path / "model.safetensors", metadata={"format": "pt"})

    plain = openseek.load_pretrained(path)
    assert len(plain.mtp) == 0
    with_mtp = openseek.load_pretrained(path, mtp=True)
    assert len(with_mtp.mtp) == 1
    assert torch.equal(with_mtp.mtp[0].eh_proj.weight, extra[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(with_mtp.mtp[0].block.ffn.experts.w3[4],
                       extra[f"model.layers.{L}.mlp.experts.4.up_proj.weight"])
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(with_mtp(ids), ref(ids).logits, atol=1e-4, rtol=0)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f"model.layers.{L}.eh_proj.weight" in f.keys()


def test_cli_convert_writes_bfloat16_that_transformers_reads(tmp_path, tiny_v2):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    (tiny_v2 / "tokenizer_config.json").write_text("{}")
    dst = tmp_path / "bf16"
    run = subprocess.run([sys.executable, "-m", "openseek", "convert", str(tiny_v2), str(dst)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (dst / "tokenizer_config.json").read_text() == "{}"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    router = ".mlp.gate."  # the router stays float32, as openseek computes it
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == ("F32" if router in k else "BF16") for k in f.keys())
    ref = AutoModelForCausalLM.from_pretrained(tiny_v2, dtype=torch.float32).state_dict()
    for name, t in AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).state_dict().items():
        want = ref[name] if router in name else ref[name].to(torch.bfloat16).float()  # rounded once
        assert torch.equal(t, want), name
    same = subprocess.run([sys.executable, "-m", "openseek", "convert", str(tiny_v2), str(tiny_v2)],
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 2 and "DST must differ from SRC" in same.stderr
