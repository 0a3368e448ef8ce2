"""The paged latent cache path (absorbed decode, chunked prefill, prefix hits) against the plain forward."""

from __future__ import annotations

import pytest
import torch

import openseek
from conftest import build_reference, save_reference
from openseek.engine.block_pool import BlockPool
from openseek.engine.runner import ModelRunner
from openseek.engine.scheduler import Scheduler
from openseek.engine.sequence import Sequence
from openseek.model import mla


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_reference(build_reference("v2", q_lora_rank=24), tmp_path_factory.mktemp("m") / "ckpt")
    return openseek.load_pretrained(path)


class Harness:
    """Scheduler + runner with teacher forcing: each sequence is fed fixed continuation tokens, and the logits
    of every step at which it samples are recorded."""

    def __init__(self, model, budget=64, block_size=4, blocks=64):
        self.pool = BlockPool(blocks)
        self.sched = Scheduler(self.pool, block_size, 8, budget)
        self.runner = ModelRunner(model, blocks, block_size)
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.cont: dict[str, list[int]] = {}

    def add(self, name, prompt, cont) -> Sequence:
        seq = Sequence(name, list(prompt), max_tokens=len(cont) + 1)
        self.logits[name], self.cont[name] = [], list(cont)
        self.sched.add(seq)
        return seq

    def run(self) -> None:
        while self.sched.has_unfinished():
            batch = self.sched.schedule()
            logits = self.runner.run(batch).sample_logits
            self.sched.after_step(batch)
            rows = iter(logits)
            for i, seq in enumerate(batch.seqs):
                if batch.samples[i]:
                    self.logits[seq.request_id].append(next(rows))
                    cont = self.cont[seq.request_id]
                    if len(seq.output_ids) < len(cont):
                        seq.output_ids.append(cont[len(seq.output_ids)])
                    else:
                        self.sched.finish(seq, "length")

    def result(self, name) -> torch.Tensor:
        return torch.stack(self.logits[name])


def reference_logits(model, prompt, cont):
    ids = torch.tensor([list(prompt) + list(cont)])
    with torch.no_grad():
        full = model(ids)[0]
    return full[len(prompt) - 1:]  # the logits at the last prompt token and at each forced token


def test_absorbed_decode_and_chunked_prefill_match_plain_forward(model):
    g = torch.Generator().manual_seed(0)
    h = Harness(model, budget=16)  # a 16-token budget forces chunked prefill next to decodes
    prompts = {}
    for n in (5, 23, 40):
        prompts[str(n)] = (torch.randint(0, 256, (n,), generator=g).tolist(),
                           torch.randint(0, 256, (64,), generator=g).tolist())
        h.add(str(n), *prompts[str(n)])
    h.run()
    for name, (prompt, cont) in prompts.items():
        torch.testing.assert_close(h.result(name), reference_logits(model, prompt, cont), atol=1e-4, rtol=0)
    assert h.pool.num_free == h.pool.num_blocks


def test_prefix_hit_gives_same_logits(model):
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (21,), generator=g).tolist()
    h = Harness(model)
    h.add("first", shared + [1, 2], [3, 4, 5])
    h.run()
    second = h.add("second", shared + [9], [8, 7])
    h.run()
    assert second.num_cached_prompt == 20  # five full 4-token blocks of the shared prefix
    torch.testing.assert_close(h.result("second"), reference_logits(model, shared + [9], [8, 7]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [4, 64])
def test_absorbed_prefill_matches_expanded(model, monkeypatch, budget):
    g = torch.Generator().manual_seed(2)
    prompt, cont = torch.randint(0, 256, (30,), generator=g).tolist(), [5, 6]
    results = []
    for ratio in (10**9, 0):  # every chunk expanded, then every chunk absorbed
        monkeypatch.setattr(mla, "PREFILL_ABSORB_RATIO", ratio)
        h = Harness(model, budget=budget)
        h.add("a", prompt, cont)
        h.run()
        results.append(h.result("a"))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(results[0], reference_logits(model, prompt, cont), atol=1e-4, rtol=0)
