"""Training end to end on a tiny preset and a small text corpus: overfitting, exact resume, export."""

from __future__ import annotations

import json

import pytest
import torch

from openseek.train.config import train_preset
from openseek.train.step import build_optimizer, build_recipe, init_weights, lr_at, train_step
from openseek.train.run import train, train_device
from openseek.model import Transformer




def tiny(corpus, **kw):
    base = dict(data=[str(corpus)], vocab_size=300, seq_len=32, batch_size=4, steps=12, eval_every=6,
                save_every=4, warmup=2, val_fraction=0.2)
    return train_preset("tiny", **{**base, **kw})


def test_tiny_model_overfits_one_batch():
    cfg = train_preset("tiny", vocab_size=300, seq_len=32, batch_size=4, lr=3e-3, warmup=0, steps=60)
    torch.manual_seed(0)
    model = Transformer(cfg.model_config())
    init_weights(model, 0.02, 0)
    model.train()
    recipe = build_recipe(cfg)
    recipe.install(model)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, 300, (4, 33))
    batch = [(x[:, :-1], x[:, 1:])]
    losses = [train_step(model, opt, recipe, batch, cfg, cfg.lr, torch.float32).loss for _ in range(60)]
    assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0]


def test_lr_schedule_is_warmup_then_two_steps_of_0316():
    cfg = train_preset("tiny", steps=100, warmup=10, lr=1.0)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 59) == 1.0 and lr_at(cfg, 60) == pytest.approx(0.316)
    assert lr_at(cfg, 90) == pytest.approx(0.316 ** 2)


def read(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    cfg = tiny(corpus, capacity_factor=1.0, alpha2=0.05, alpha3=0.02, n_devices=4, device_limit=1)
    whole = tmp_path / "whole"
    train(cfg, whole, progress=False)
    split = tmp_path / "split"
    # stopped after 24 sequences, not a multiple of the 10 that hold one exempt from dropping: a resume that
    # numbered them from 0 again would drop other pairs
    assert train(cfg, split, stop_at=6, progress=False) is None  # stops cleanly, no export yet
    assert train(cfg, split, resume=True, progress=False) is not None
    a = [(r["step"], r["loss"], r["aux"]) for r in read(whole) if r["kind"] == "train"]
    b = [(r["step"], r["loss"], r["aux"]) for r in read(split) if r["kind"] == "train"]
    assert len(a) == 12 and a == b  # bit for bit: model, optimiser, data position, RNG
    va = [r["loss"] for r in read(whole) if r["kind"] == "val"]
    assert va == [r["loss"] for r in read(split) if r["kind"] == "val"]
    checkpoints = sorted((split / "checkpoints").glob("ckpt-*.pt"))
    assert len(checkpoints) == 2  # keep_last


def test_metrics_report_balance_losses_and_expert_load(corpus, tmp_path):
    out = tmp_path / "m"
    train(tiny(corpus, steps=3, alpha2=0.05, n_devices=2, device_limit=1), out, progress=False)
    rec = [r for r in read(out) if r["kind"] == "train"][-1]
    assert set(rec["aux"]) == {"expert_balance", "device_balance"}
    assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1
    assert rec["moe"][0]["max_over_mean"] >= 1.0 and "dead" in rec["moe"][0]


def test_export_loads_in_transformers_with_identical_logits(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    import openseek
    path = train(tiny(corpus, steps=4), tmp_path / "e", progress=False)
    ours = openseek.load_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=0)
    llm = openseek.LLM(path)  # the engine serves it, tokenizer included
    out = llm.generate("def add", openseek.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="grad_accum=3") as e:
        train_preset("tiny", batch_size=8, grad_accum=3)
    assert e.value.field == "grad_accum"
    for field, value in (("steps", "10"), ("lr", float("nan")), ("sft", 1), ("capacity_factor", "1")):
        with pytest.raises(ValueError, match=f"train config {field}=.* is invalid") as e:
            train_preset("tiny", **{field: value})
        assert e.value.field == field
    with pytest.raises(ValueError, match="unknown train preset 'huge'"):
        train_preset("huge")


def test_cli_train_resume_and_plot(corpus, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "openseek", "train", "--preset", "tiny", "--data", str(corpus), "--vocab-size",
            "300", "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--warmup", "1", "--save-every", "2",
            "--eval-every", "2", "--out", str(out), "--no-progress"]
    first = subprocess.run(base + ["--stop-at", "2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "stopped" in first.stdout, first.stderr
    second = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "exported" in second.stdout, second.stderr
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    plot = subprocess.run([sys.executable, "-m", "openseek", "plot", str(out)], capture_output=True, text=True)
    assert plot.returncode == 0 and (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").exists()
    bad = subprocess.run(base + ["--grad-accum", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "grad_accum=3" in bad.stderr


def test_device_is_validated_and_resolved():
    with pytest.raises(ValueError, match="train config device='gpu' is invalid: allowed: auto, cpu, cuda"):
        train_preset("tiny", device="gpu")
    assert train_preset("tiny").device == "cpu"  # tests and smoke runs stay on the CPU, bit-exact
    assert train_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert train_device("auto").type == "cuda"
    else:
        assert train_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device='cuda': no CUDA device is available"):
            train_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_a_gpu_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no CUDA device"):
        train(train_preset("tiny", device="cuda"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_v3_model_trains_device_limited_with_bias_updates_and_exports_its_own_config(corpus, tmp_path):
    from safetensors.torch import load_file

    from openseek.train.config import TRAIN_PRESETS
    v3 = {**TRAIN_PRESETS["tiny"]["model"], "model_type": "deepseek_v3", "scoring_func": "sigmoid",
          "topk_method": "noaux_tc"}
    path = train(tiny(corpus, steps=3, model=v3, n_devices=2, device_limit=1, bias_update_speed=0.01), tmp_path / "v3",
                 progress=False)
    exported = json.loads((path / "config.json").read_text())
    assert (exported["topk_method"], exported["n_group"], exported["topk_group"]) == ("noaux_tc", 1, 1)
    assert (load_file(path / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"] != 0).any()


class _Planted:
    """Unpickling this runs open(marker, "w"): what a planted checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from openseek.train import checkpoint

    marker = tmp_path / "pwned"
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 1, "config": _Planted(marker)}, tmp_path / "out" / "checkpoints" / "ckpt-0000001.pt")
    with pytest.raises(ValueError, match="none of the 1 checkpoints .* loads"):
        checkpoint.restore(tmp_path / "out", train_preset("tiny"), None, None, None, None)
    assert not marker.exists()


def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(corpus, tmp_path, caplog):
    cfg = tiny(corpus, steps=8, save_every=2, eval_every=100)
    out = tmp_path / "t"
    train(cfg, out, stop_at=6, progress=False)  # checkpoints 4 and 6 (keep_last=2)
    first = {r["step"]: r["loss"] for r in read(out) if r["kind"] == "train"}
    newest = out / "checkpoints" / "ckpt-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a crash mid-write, before fsync and rename existed
    with caplog.at_level("WARNING", logger="openseek.train.checkpoint"):
        assert train(cfg, out, resume=True, progress=False) is not None
    assert "ckpt-0000006.pt" in caplog.text and "skipping" in caplog.text
    again = {r["step"]: r["loss"] for r in read(out) if r["kind"] == "train"}
    assert sorted(again) == list(range(1, 9))
    assert [again[s] for s in (5, 6)] == [first[s] for s in (5, 6)]  # resumed at step 4, bit for bit


def test_checkpoint_is_fsynced_before_the_rename(corpus, tmp_path, monkeypatch):
    import os

    from openseek.train import checkpoint

    events = []  # (what, path) for every fsync and rename under the checkpoints folder
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    train(tiny(corpus, steps=2, save_every=2, eval_every=100), tmp_path / "f", progress=False)
    ckpt_dir = str((tmp_path / "f" / "checkpoints").resolve())
    ours = [e for e in events if e[1].startswith(ckpt_dir)]
    # the temp file's data, the rename, the folder's entry
    assert ours == [("fsync", ckpt_dir + "/ckpt-0000002.tmp"), ("replace", ckpt_dir + "/ckpt-0000002.pt"),
                    ("fsync", ckpt_dir)]
    state = torch.load(next((tmp_path / "f" / "checkpoints").glob("ckpt-*.pt")), weights_only=True)
    assert state["step"] == 2


def test_corpus_too_small_for_the_vocab_is_one_error_and_a_retry_in_the_same_out_works(tmp_path, capsys, caplog):
    """The old run warned, wrote the short tokenizer, then said 'use a fresh --out' about the fresh folder; every
    retry in that folder failed the same way."""
    import re

    from openseek.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_text("def f(x):\n    return x + 1\n" * 3)
    (tmp_path / "data" / "b.py").write_text("def g(y):\n    return y * 2\n" * 3)
    out = tmp_path / "out"
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress",
            "--steps", "2", "--seq-len", "8", "--batch-size", "2", "--warmup", "1", "--eval-every", "2",
            "--save-every", "2", "--val-fraction", "0.5"]
    with caplog.at_level("WARNING"):
        assert main(argv + ["--vocab-size", "512"]) == 2
    err = capsys.readouterr().err
    m = re.fullmatch(r"error: vocab_size=512: the corpus sample ran out of merges at (\d+) tokens; ask for "
                     r"vocab_size=\1 or fewer, or give more text\n", err)
    assert m and "fresh" not in err and not caplog.records, (err, caplog.text)
    assert not (out / "data" / "tokenizer").exists()
    supported = int(m.group(1))
    assert main(argv + ["--vocab-size", str(supported)]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((out / "model" / "config.json").read_text())["vocab_size"] == supported


def test_model_larger_than_the_machine_is_refused_before_any_work(corpus, tmp_path):
    """A dense layer of 65536 x 2^20 is 275 GB per matrix: the old run trained a tokenizer, then failed allocating
    with a RuntimeError."""
    import os

    if 4 * 3 * (1 << 36) <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        pytest.skip("this machine holds one such dense layer")
    big = dict(train_preset("tiny").model, hidden_size=1 << 16, intermediate_size=1 << 20)
    with pytest.raises(ValueError, match=r"parameters take [\d,]+ GiB in float32, more than this machine's"):
        train(tiny(corpus, model=big), tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()


def test_train_config_checks_its_model_when_built(tmp_path):
    """These reached the model build (after the tokenizer and data) or a raw TypeError before."""
    for model, field, message in (([1], "model", "must be an object"),
                                  ({"hiden_size": 64}, "model", "unknown ModelConfig fields: hiden_size"),
                                  ({"max_position_embeddings": 0}, "max_position_embeddings", r"\[2, ")):
        with pytest.raises(ValueError, match=message) as e:
            train_preset("tiny", model=model)
        assert e.value.field == field
    (tmp_path / "train.json").write_text("[1, 2]")
    from openseek.train.config import TrainConfig
    with pytest.raises(ValueError, match="train.json holds list, not a JSON object"):
        TrainConfig.from_file(tmp_path / "train.json")
