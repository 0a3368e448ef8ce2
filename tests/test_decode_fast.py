"""The decode step's fast paths give today's tokens: the eager kernels against the plain forward, each rewritten
kernel against the one it replaces, and the compiled decode (EngineConfig.compile) against eager."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import openseek
from openseek import BUNDLED_MODEL
from openseek.model import layers, ops


@pytest.fixture(scope="module")
def bundled():
    return openseek.load_pretrained(BUNDLED_MODEL, dtype=torch.float32)


def prompts(n: int, length: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4000, (length,), generator=g).tolist() for _ in range(n)]


def greedy(model, batch: list[list[int]], new: int, **fields) -> list[list[int]]:
    llm = openseek.LLM(model, max_num_seqs=len(batch), enable_prefix_caching=False, max_model_len=128, **fields)
    params = openseek.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate([{"prompt_token_ids": p} for p in batch], params)]


def recomputed_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Greedy by the plain forward over the whole sequence at every step: no cache, no decode kernels."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_decode_matches_full_recompute_in_float32(bundled):
    batch = prompts(3)
    want = [recomputed_greedy(bundled, p, 16) for p in batch]
    assert greedy(bundled, batch, 16) == want  # batch 3: padded contexts, the decode mask
    assert greedy(bundled, batch[:1], 16) == want[:1]  # batch 1: the one-token experts path


def test_rms_norm_inference_is_bit_identical_to_the_reference():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, scale in (((1, 1, 256), 1.0), ((3, 7, 64), 1e-3), ((2, 512), 1e3)):
            x = (torch.randn(shape, generator=g) * scale).to(dtype)
            w = torch.randn(shape[-1], generator=g).to(dtype)
            assert torch.equal(ops.rms_norm_inference(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))


def test_rope_pairs_is_bit_identical_to_the_complex_rotation():
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 5, 4, 16), (2, 3, 16), (1, 1, 16, 64)):
        x = torch.randn(shape, generator=g) * 3
        angles = torch.rand(shape[0], shape[1], shape[-1] // 2, generator=g) * 100
        freqs_cis = torch.polar(torch.full_like(angles, 1.3), angles)
        assert torch.equal(ops.rope_pairs(x, freqs_cis), layers.apply_rope(x, freqs_cis))
        q_pe = torch.randn(*shape[:-1], shape[-1] + 8, generator=g)[..., 8:]  # a strided view, as split gives
        assert torch.equal(ops.rope_pairs(q_pe, freqs_cis), layers.apply_rope(q_pe, freqs_cis))


@pytest.mark.parametrize("N", [1, 5])
def test_gathered_experts_match_the_per_expert_reference(N):
    g = torch.Generator().manual_seed(N)
    E, F_, D, K = 8, 12, 16, 3
    w1, w3 = torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g)
    w2, x = torch.randn(E, D, F_, generator=g), torch.randn(N, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])  # (N, K) distinct per token
    weights = torch.rand(N, K, generator=g)
    want = torch.stack([sum(weights[n, k] * (F.silu(x[n] @ w1[e].T) * (x[n] @ w3[e].T)) @ w2[e].T
                            for k, e in enumerate(ids[n].tolist())) for n in range(N)])
    torch.testing.assert_close(ops.experts_gathered(w1, w2, w3, x, weights, ids), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ops.experts_inference(w1, w2, w3, x, weights, ids), want, atol=1e-4, rtol=1e-5)


def test_a_failing_compiled_decode_falls_back_to_eager_and_says_why(bundled, caplog):
    batch = prompts(2, seed=1)
    llm = openseek.LLM(bundled, max_num_seqs=2, enable_prefix_caching=False, max_model_len=128)
    runner = llm.llm_engine.runner

    def broken(*args):
        raise RuntimeError("no compiler here")

    runner._decode = broken
    params = openseek.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with caplog.at_level(logging.WARNING):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    assert [o.outputs[0].token_ids for o in outs] == greedy(bundled, batch, 6)
    assert runner._decode is None and "no compiler here" in caplog.text


COMPILED_RUN = """
import json, logging, sys
import torch, openseek
from openseek import BUNDLED_MODEL
sys.path.insert(0, sys.argv[1])
from test_decode_fast import greedy, prompts
logging.basicConfig(level=logging.WARNING)
model = openseek.load_pretrained(BUNDLED_MODEL, dtype=torch.float32)
batch = prompts(3, seed=2)
int4 = openseek.load_pretrained(BUNDLED_MODEL, dtype=torch.float32, quantization="int4")
# weights changed in place and renewed (as GRPO does) after the graph was built: the graph must see them
llm = openseek.LLM(model, max_num_seqs=1, enable_prefix_caching=False, max_model_len=128, compile=True)
params = openseek.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
llm.generate({"prompt_token_ids": batch[0]}, params)
with torch.no_grad():
    for layer in model.layers:
        layer.attn.wkv_b.weight.mul_(-1.5)
llm.llm_engine.update_weights()
renewed = llm.generate({"prompt_token_ids": batch[0]}, params)[0].outputs[0].token_ids
print(json.dumps([greedy(model, batch, 12, compile=True), greedy(model, batch[:1], 12, compile=True),
                  greedy(model, batch, 12), greedy(int4, batch, 12, compile=True), greedy(int4, batch, 12),
                  renewed, greedy(model, batch[:1], 12)[0]]))
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
def test_compiled_decode_gives_the_eager_tokens():
    # in a process of its own: inductor's state left in the test process made a later torch.multiprocessing
    # spawn (test_distributed) abort
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", COMPILED_RUN, str(tests)], capture_output=True, text=True,
                         timeout=900, check=True, env=env)
    assert "compiled decode failed" not in out.stderr  # the graph itself ran, not the fallback
    compiled, compiled_one, eager, compiled_int4, eager_int4, renewed, eager_renewed = \
        json.loads(out.stdout.splitlines()[-1])
    assert renewed == eager_renewed  # the compiled graph after update_weights, against eager on the new weights
    assert compiled == eager
    assert compiled_int4 == eager_int4  # the quantised experts' custom op inside the graph
    assert compiled_one == eager[:1]  # batch 1: its own graph


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile"):
        openseek.EngineConfig(compile="yes")


def test_each_layer_caches_in_a_tensor_of_its_own(bundled):
    # a view of one (layers, slots, C + R) tensor, written in place inside the compiled graph, was copied out and
    # back whole by functionalization every step: a step cost the size of the cache, not of the tokens
    cache = openseek.LLM(bundled, max_num_seqs=2, max_model_len=64).llm_engine.runner.kv_cache
    assert len(cache) == bundled.config.num_hidden_layers
    assert len({c.untyped_storage().data_ptr() for c in cache}) == len(cache)
    assert all(c.is_contiguous() and c._base is None for c in cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_compiled_head_bmm_matches_bmm(dtype, M):
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(4, M, 16, generator=g).to(dtype), torch.randn(4, 16, 24, generator=g).to(dtype)
    want = torch.bmm(x.float(), w.float())
    got = ops.head_bmm_compiled(x, w)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("G", [1, 4], ids=["int8-per-row", "int4-groups"])
def test_compiled_head_bmm_on_int_values_and_block_scales_matches_bmm(G):
    """MLA's absorbed weights of a quantised wkv_b as int values and scales (mla.MLA._absorb_int8): W_UK^T's scales
    vary along the summed dim and are grouped along the output, W_UV's the other way round."""
    g = torch.Generator().manual_seed(G)
    H, Q, C = 3, 16, 32
    q = torch.randint(-8, 8, (H, 2 * Q, C), dtype=torch.int8, generator=g)  # (H, Q + U, C) as wkv_b holds them
    s = torch.rand(H, 2 * Q, G, generator=g) + 0.5
    w = (q.float().view(H, 2 * Q, G, -1) * s[..., None]).view(H, 2 * Q, C)
    cases = [(torch.randn(H, 1, Q, generator=g), w[:, :Q], q[:, :Q].transpose(1, 2), s[:, :Q].transpose(1, 2)),
             (torch.randn(H, 1, C, generator=g), w[:, Q:].transpose(1, 2), q[:, Q:], s[:, Q:])]
    for x, w_HKN, q_HNK, s_HGG in cases:
        want = torch.bmm(x.double(), w_HKN.double())
        got = ops.head_bmm_compiled(x, w_HKN, (q_HNK.contiguous(), s_HGG.contiguous()))
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
