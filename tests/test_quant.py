"""Weight-only int8 / int4: the quantisation bound, the packed layouts, the kernels against the dequantised
reference, loading (bf16/float32 and fp8 checkpoints), convert -> load, the engine, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import openseek
from conftest import build_reference, save_reference
from openseek import LLM, SamplingParams
from openseek.model import ops, quant
from openseek.model.ops import REFERENCE, experts_inference, experts_reference, linear_inference
from openseek.model.quant import QuantizedWeight, QuantScheme
from openseek.validation import FieldError

SCHEMES = [("int8", None), ("int4", 32)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def quantized_weight(w: torch.Tensor, scheme: str, group: int | None) -> QuantizedWeight:
    qw = QuantizedWeight(scheme, tuple(w.shape), group, w.dtype, "cpu")
    for e in range(w.shape[0]) if w.dim() == 3 else [None]:
        qw.set(w if e is None else w[e], e)
    return qw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_reference(build_reference("v2"), tmp_path_factory.mktemp("quant") / "v2")


# ---- the numbers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantisation_error_is_at_most_half_a_scale(scheme, group):
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3  # rows of different ranges
    q, s = quant.quantize(w, scheme, group)
    qmax = quant.QMAX[scheme]
    assert q.dtype == torch.int8 and q.min() >= -qmax - (scheme == "int4") and q.max() <= qmax
    s_full = s.float()[:, None].expand(48, 128) if scheme == "int8" else s.float().repeat_interleave(group, 1)
    err = (w - q.float() * s_full).abs()
    assert (err <= s_full / 2 * (1 + 1e-6)).all()
    assert (err.amax(1) > s_full.amax(1) / 8).all()  # the bound is not vacuous: errors of that size occur


def test_int4_packings_round_trip_and_match_compressed_tensors_bit_order():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = quant.pack_int32(q)
    # column 8j + i in bits 4i.. of word j, stored as q + 8: -8..-1 -> 0x76543210, 0..7 -> 0xFEDCBA98
    assert packed[0].tolist() == [0x76543210, 0xFEDCBA98 - 2**32] * 2
    assert torch.equal(quant.unpack_int32(packed, 32), q)
    for rows in (16, 40, 64, 96, 200):  # full 64-row blocks, a partial one, rows padded to 16
        q = torch.randint(-8, 8, (rows, 64), dtype=torch.int8)
        assert torch.equal(quant.from_cpu_int4(quant.to_cpu_int4(q), rows), q), rows


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 130])  # 130: past PACKED_MAX_ROWS, dequantise + GEMM
def test_quantised_linear_matches_the_dequantised_reference(scheme, group, dtype, rows):
    torch.manual_seed(0)
    qw = quantized_weight(torch.randn(72, 96) / 10, scheme, group)
    x = torch.randn(rows, 96, dtype=dtype)
    want = F.linear(x.float(), qw.dequantize(dtype=torch.float32))
    got = linear_inference(x, qw)
    assert got.dtype == dtype and got.shape == want.shape
    # the packed kernels run on bf16 activations: tolerance 1% of the output's range
    torch.testing.assert_close(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=0)
    # a strided input, as a bf16 model's split latents are (the kernels refuse one that is not contiguous)
    strided = torch.cat([x, x], -1)[..., ::2]
    torch.testing.assert_close(linear_inference(strided, qw).float(), F.linear(strided.float(), qw.dequantize(
        dtype=torch.float32)), atol=1e-2 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 6])
def test_quantised_experts_match_the_reference_and_touch_only_the_chosen(scheme, group, dtype, N, monkeypatch):
    torch.manual_seed(1)
    E, F_, D, K = 8, 32, 64, 2
    w1, w3, w2 = (quantized_weight(torch.randn(E, *s) / 8, scheme, group) for s in ((F_, D), (F_, D), (D, F_)))
    x = torch.randn(N, D, dtype=dtype)
    ids = torch.stack([torch.randperm(4)[:K] for _ in range(N)])  # experts 4..7 never chosen
    weights = torch.rand(N, K)
    want = experts_reference(w1, w2, w3, x.float(), weights, ids)
    touched = set()
    packed, indexed = QuantizedWeight.matmul_packed, QuantizedWeight.matmul_indexed
    monkeypatch.setattr(QuantizedWeight, "matmul_packed", lambda self, x, e=None: touched.add(e) or packed(self, x, e))
    monkeypatch.setattr(QuantizedWeight, "matmul_indexed",  # openseek's int4 kernel: every pair in one call
                        lambda self, x, ids: touched.update(ids.tolist()) or indexed(self, x, ids))
    got = experts_inference(w1, w2, w3, x, weights, ids)
    assert got.dtype == dtype and touched == set(ids.flatten().tolist())
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=0)


# ---- loading ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_load_quantises_every_matmul_weight_and_keeps_no_float_copy(tiny, scheme, group):
    float_model = openseek.load_pretrained(tiny)
    model = openseek.load_pretrained(tiny, quantization=scheme, group_size=group)
    float_params = {n: p for n, p in float_model.named_parameters()}
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    matmuls = {n for n, p in float_params.items() if p.dim() >= 2 and not n.startswith(("embed.", "head."))
               and ".gate." not in n}
    assert quantized == matmuls
    for n, p in model.named_parameters():  # what stays float: embedding, lm_head, norms, the float32 router
        assert n.startswith(("embed.", "head.")) or p.dim() == 1 or ".gate." in n, n
        assert p.dtype == (torch.float32 if ".gate." in n else float_params[n].dtype)
    # resident bytes: no float copy of a quantised weight is held anywhere in the model
    bits = 8 if scheme == "int8" else 4
    float_bytes = sum(p.numel() * 4 for n, p in float_params.items() if n not in matmuls)
    quant_bytes = sum(float_params[n].numel() * bits / 8 for n in matmuls)
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.dtype != torch.complex64) - sum(b.numel() * 4 for n, b in model.named_buffers()
                                                    if n.endswith("inv_freq"))
    assert held < 1.15 * (float_bytes + quant_bytes)  # scales and int4's row padding on top
    qw = model.layers[1].ffn.experts.w2
    for e in range(qw.shape[0]):  # each expert quantised on its own, from the checkpoint's tensor
        q, s = quant.quantize(float_params["layers.1.ffn.experts.w2"][e], scheme, group)
        assert torch.equal(qw.quantized(e)[0], q) and torch.equal(qw.scales(e), s)


def test_quantised_model_moves_casts_and_lists_its_buffers(tiny):
    model = openseek.load_pretrained(tiny, quantization="int4", group_size=32)
    wq = model.layers[0].attn.wq.weight
    assert {"layers.0.attn.wq.weight.qweight", "layers.0.attn.wq.weight.scale"} <= set(model.state_dict())
    assert not any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters())
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        want = model(ids, kernels=REFERENCE).float()
        model.to("cpu").to(torch.bfloat16)
        assert wq.dtype == torch.bfloat16 and wq.scale.dtype == torch.bfloat16 and wq.qweight.dtype == torch.uint8
        assert model.layers[1].ffn.gate.weight.dtype == torch.bfloat16  # as for any model: .to casts all floats
        got = model(ids, kernels=REFERENCE).float()
    torch.testing.assert_close(got, want, atol=0.1 * want.abs().max().item(), rtol=0)


def test_fp8_checkpoint_quantises_to_int8_on_load(tmp_path):
    from test_weights import quantize_fp8

    path = save_reference(build_reference("v3", hidden_size=192, kv_lora_rank=64, moe_intermediate_size=64,
                                           intermediate_size=128, num_hidden_layers=2), tmp_path / "fp8")
    tensors = load_file(path / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name and ".mlp.gate." not in name:
            out[name], out[name + "_scale_inv"] = quantize_fp8(t)
        else:
            out[name] = t
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    dequantised = openseek.load_pretrained(path)
    model = openseek.load_pretrained(path, quantization="int8")
    assert model.layers[1].attn.wq.weight.qweight.dtype == torch.int8
    for name, m in model.named_modules():
        if isinstance(m, QuantizedWeight):
            w = dequantised.get_parameter(name)
            for e in range(w.shape[0]) if w.dim() == 3 else [None]:
                q, s = quant.quantize(w if e is None else w[e], "int8", None)
                assert torch.equal(m.quantized(e)[0], q) and torch.equal(m.scales(e), s), name


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_convert_then_load_gives_the_logits_of_quantise_on_load(tiny, tmp_path, scheme, group):
    from openseek.cli import main

    dst = tmp_path / scheme
    assert main(["convert", str(tiny), str(dst), "--dtype", "float32", "--quantize", scheme,
                 "--group-size", str(group or 128)]) == 0
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and quant.scheme_of(qc) == QuantScheme(scheme, group)
    with safe_open(dst / "model.safetensors", "pt") as f:
        names = set(f.keys())
        base = "model.layers.0.self_attn.q_proj."
        if scheme == "int8":
            assert f.get_tensor(base + "weight").dtype == torch.int8 and f.get_slice(base + "weight_scale")
        else:
            assert f.get_tensor(base + "weight_packed").dtype == torch.int32
            assert f.get_tensor(base + "weight_shape").tolist() == [4 * 24, 64]
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert "lm_head.weight" in names and "lm_head.weight_scale" not in names
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        want = openseek.load_pretrained(tiny, quantization=scheme, group_size=group or 128)(ids)
        assert torch.equal(openseek.load_pretrained(dst)(ids), want)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_absorbed_int_copies_are_exactly_the_float_ones(tiny, scheme, group):
    """A quantised wkv_b's absorbed W_UK / W_UV^T also kept as its int values and scales, which COMPILED reads:
    q * s must be the float copy bit for bit, so eager and compiled decode read one weight."""
    model = openseek.load_pretrained(tiny, quantization=scheme, group_size=group)
    model.absorb_weights()
    attn = model.layers[0].attn
    H, C = attn.n_heads, attn.kv_lora_rank
    G = attn.w_uk_scale.shape[1]
    assert attn.w_uk_int8.dtype == torch.int8 and G == (1 if scheme == "int8" else C // group)
    uk = attn.w_uk_int8.float().unflatten(1, (G, -1)) * attn.w_uk_scale[:, :, None]  # (H, G, C / G, Q)
    uv = attn.w_uv_int8.float().unflatten(2, (G, -1)) * attn.w_uv_scale[..., None]  # (H, U, G, C / G)
    assert torch.equal(uk.flatten(1, 2).transpose(1, 2), attn.w_uk)
    assert torch.equal(uv.flatten(2).transpose(1, 2), attn.w_uv_t)
    float_model = openseek.load_pretrained(tiny)
    float_model.absorb_weights()
    assert float_model.layers[0].attn.w_uk_int8 is None and float_model.layers[0].attn.w_uv_scale is None


# ---- the engine -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_batched_greedy_matches_single_sequence_under_quantisation(tiny, scheme, group):
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 250, (3 + 4 * i,), generator=g).tolist()} for i in range(5)]
    if scheme == "int8":
        llm = LLM(tiny, quantization="int8", block_size=4)  # EngineConfig's path
    else:
        llm = LLM(openseek.load_pretrained(tiny, quantization=scheme, group_size=group), block_size=4)
    model = llm.llm_engine.model
    attn = model.layers[0].attn
    assert isinstance(attn.wkv_b.weight, QuantizedWeight) and attn.w_uk.dtype == torch.float32
    assert torch.equal(attn.w_uk, attn.wkv_b.weight.dequantize().view(4, 32, 32)[:, :16])
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert batch == alone
    with torch.no_grad():  # the first token agrees with the dense reference forward
        first = [model(torch.tensor([p["prompt_token_ids"]]), kernels=REFERENCE)[0, -1].argmax().item()
                 for p in prompts]
    assert sum(f == b[0] for f, b in zip(first, batch)) >= 4


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_unknown_scheme_and_indivisible_group_are_named(tiny):
    with pytest.raises(ValueError, match="quantization='int3' is not a known scheme"):
        openseek.load_pretrained(tiny, quantization="int3")
    with pytest.raises(ValueError, match="group_size=48 is invalid"):
        openseek.load_pretrained(tiny, quantization="int4", group_size=48)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide layers\.0\.attn\.wkv_b\.weight"):
        openseek.load_pretrained(tiny, quantization="int4", group_size=64)  # kv_lora_rank is 32
    with pytest.raises(FieldError, match="quantization"):
        LLM(tiny, quantization="fp4")
    with pytest.raises(FieldError, match="quantization_group_size"):
        LLM(tiny, quantization="int4", quantization_group_size=100)


def test_int4_without_a_group_size_takes_the_largest_that_divides_every_input(tiny, tmp_path):
    model = openseek.load_pretrained(tiny, quantization="int4")  # inputs 32 (kv_lora_rank) and wider: 128 fails
    assert model.config.quantization_config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(model(ids), openseek.load_pretrained(tiny, quantization="int4", group_size=32)(ids),
                               rtol=0, atol=0)
    from openseek.cli import main

    assert main(["convert", str(tiny), str(tmp_path / "q"), "--quantize", "int4"]) == 0


@pytest.fixture(scope="module")
def int4_checkpoint(tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int4") / "ckpt"
    openseek.save_pretrained(openseek.load_pretrained(tiny, quantization="int4", group_size=32), dst)
    return dst


def _rewrite(src, dst, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_missing_or_misshaped_scales_are_named(int4_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    _rewrite(int4_checkpoint, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensors.*{name}"):
        openseek.load_pretrained(tmp_path / "missing")
    _rewrite(int4_checkpoint, tmp_path / "shape", lambda t: t.update({name: t[name][:, :1].contiguous()}))
    with pytest.raises(ValueError, match=rf"mis-shaped.*{name}.*shape \[64, 1\], expected \[64, 2\]"):
        openseek.load_pretrained(tmp_path / "shape")
    packed = "model.layers.0.self_attn.o_proj.weight_packed"
    _rewrite(int4_checkpoint, tmp_path / "dtype", lambda t: t.update({packed: t[packed].float()}))
    with pytest.raises(ValueError, match=f"{packed}: dtype torch.float32"):
        openseek.load_pretrained(tmp_path / "dtype")
    with pytest.raises(ValueError, match="stored as int4"):
        openseek.load_pretrained(int4_checkpoint, quantization="int8")


@pytest.mark.parametrize("edit,message", [
    (lambda qc: qc.update(quant_method="gptq"), "quant_method='gptq' is not supported"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=3), "num_bits=3"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False), "symmetric"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=48), "group_size=48"),
])
def test_unsupported_quantization_config_is_named(int4_checkpoint, tmp_path, edit, message):
    import shutil

    dst = shutil.copytree(int4_checkpoint, tmp_path / "c")
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        openseek.load_pretrained(dst)


# ---- COMPILED's single-row kernels (the compiled decode's; eager here, the same math) ----------------------------

@pytest.mark.parametrize("scheme,group", [(None, None)] + SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_linear_matches_the_dequantised_reference(scheme, group, dtype, rows):
    torch.manual_seed(2)
    w = torch.randn(72, 96) / 10
    weight = w.to(dtype) if scheme is None else quantized_weight(w, scheme, group)
    x = torch.randn(1, rows, 96, dtype=dtype)
    want = F.linear(x.float(), ops.dense(weight).float())
    got = ops.linear_compiled(x, weight)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("scheme,group", [(None, None)] + SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 4])
def test_compiled_experts_match_the_reference(scheme, group, dtype, N):
    torch.manual_seed(3)
    E, F_, D, K = 8, 32, 64, 3
    ws = [torch.randn(E, *s) / 8 for s in ((F_, D), (F_, D), (D, F_))]
    w1, w3, w2 = (w.to(dtype) if scheme is None else quantized_weight(w, scheme, group) for w in ws)
    x = torch.randn(N, D, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    weights = torch.rand(N, K)
    want = experts_reference(*(ops.dense(w).float() for w in (w1, w2, w3)), x.float(), weights, ids)
    got = ops.experts_compiled(w1, w2, w3, x, weights, ids)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=0)
    # one graph: the quantised experts' loop (a .tolist()) broke the compiled decode's at every MoE layer
    torch._dynamo.reset()  # each case a fresh trace, not a recompile counted against dynamo's limit
    explained = torch._dynamo.explain(ops.experts_compiled)(w1, w2, w3, x, weights, ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
