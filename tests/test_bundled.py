"""The bundled demo model: small, complete, trained, and the default of `serve`, `generate` and `chat`."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

import openseek
from openseek import BUNDLED_MODEL, LLM, SamplingParams
from openseek.tokenizer import Tokenizer
from openseek.train.bpe import CHAT_TEMPLATE
from server_util import Server

CODE = '''def mean(values):
    """Return the arithmetic mean of a list of numbers."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)
'''


def greedy(prompt, max_tokens: int) -> str:
    llm = LLM(BUNDLED_MODEL, dtype=torch.float32, max_num_seqs=1)
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0].text


def chat_prompt(text: str) -> dict:
    tok = Tokenizer.from_pretrained(BUNDLED_MODEL)
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return {"prompt_token_ids": tok.encode(rendered, add_special_tokens=False)}


def test_bundled_model_is_small_complete_mla_moe_with_the_v2_chat_template():
    files = {p.name: p.stat().st_size for p in BUNDLED_MODEL.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 60 * 2**20
    cfg = openseek.ModelConfig.from_file(BUNDLED_MODEL)
    assert cfg.kv_lora_rank and cfg.n_routed_experts and cfg.n_shared_experts
    assert Tokenizer.from_pretrained(BUNDLED_MODEL).chat_template == CHAT_TEMPLATE


def test_bundled_model_is_trained_on_python():
    """Cross-entropy on unseen code far below the uniform ln(V) nats of an untrained model."""
    tok = Tokenizer.from_pretrained(BUNDLED_MODEL)
    model = openseek.load_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    ids = torch.tensor([tok.encode(CODE)])
    with torch.no_grad():
        nats = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    assert nats < 0.4 * torch.log(torch.tensor(float(tok.vocab_size))).item(), nats


def test_serve_without_model_serves_the_bundled_model(tmp_path):
    srv = Server(None, tmp_path / "server.log", name=None)
    try:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == ["openseek-demo"]
        done = client.completions.create(model="openseek-demo", prompt="def ", max_tokens=12, temperature=0)
        assert done.choices[0].text == greedy("def ", 12)
        question = "Return the arithmetic mean of a list of numbers."
        reply = client.chat.completions.create(model="openseek-demo", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": question}])
        assert reply.choices[0].message.content == greedy(chat_prompt(question), 12)
    finally:
        assert srv.stop() == 0, srv.log.read_text()


def test_generate_and_chat_default_to_the_bundled_model():
    run = subprocess.run([sys.executable, "-m", "openseek", "generate", "--max-tokens", "8", "import "],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == greedy("import ", 8) + "\n", run.stderr
    question = "Return True if the path exists."
    run = subprocess.run([sys.executable, "-m", "openseek", "chat", "--temperature", "0", "--max-tokens", "8"],
                         input=question + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == greedy(chat_prompt(question), 8) + "\n", run.stderr
