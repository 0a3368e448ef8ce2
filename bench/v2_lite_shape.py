"""DeepSeek-V2-Lite at its real shape on this machine: a random-weight checkpoint with V2-Lite's exact config
(27 layers, hidden 2048, 64 routed experts top-6 + 2 shared, kv_lora_rank 512, vocabulary 102400; 15.7B
parameters, 31 GB in bfloat16), loaded with int8 and int4 weights, with peak RSS and decode tok/s.

    python bench/v2_lite_shape.py write [--path /tmp/openseek-bench/v2-lite-real]   # ~31 GB, shard by shard
    python bench/v2_lite_shape.py run [--path ...] [--formats int8,int4] [--new-tokens 16]

`write` takes the hub's tensor names and shapes from openseek's model built on the meta device (nothing
allocated; its name map is the one the parity tests check against transformers), then writes each tensor's random bfloat16 values (normal, std 0.02 as transformers initialises; norms 1)
into ~4 GB safetensors shards with the hub's index, holding one shard at a time; the bundled model's tokenizer
goes beside them (its ids are a subset of the 102400; generated ids past its vocabulary decode to nothing).

`run` runs, for each format, in a fresh process: `openseek generate --model PATH --quantization FORMAT` (the
command a user types) and reports its peak RSS (its own ru_maxrss from wait4; this process imports no torch,
so a fork starts small); then a timing process that loads the same way and times greedy decode (N new
tokens minus 1, prefill excluded). Not in the test run: it writes ~31 GB and each load reads them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(os.environ.get("OPENSEEK_BENCH_DIR", "/tmp/openseek-bench"))
SHARD_BYTES = 4 << 30
INIT_STD = 0.02  # transformers' initializer_range for DeepSeek-V2

TIMING = """
import sys, time, torch, openseek
path, quantization, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
llm = openseek.LLM(path, quantization=quantization, max_num_seqs=1, max_model_len=256, enable_prefix_caching=False)
load_s = time.perf_counter() - t
prompt = {"prompt_token_ids": list(range(1000, 1064))}
def gen(k):
    t = time.perf_counter()
    out = llm.generate(prompt, openseek.SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))[0]
    if out.error or len(out.outputs[0].token_ids) != k:
        raise SystemExit(f"generate failed: {out.error or len(out.outputs[0].token_ids)} tokens, not {k}")
    return time.perf_counter() - t
gen(2)  # warm-up
one, many = min(gen(1) for _ in range(2)), min(gen(new) for _ in range(2))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(f"RESULT load_s={load_s:.1f} tok_s={(new - 1) / (many - one):.2f} hwm_gib={int(hwm) / 2**20:.2f}")
"""


def write(path: Path) -> None:
    """The checkpoint at path, unless one is there."""
    import torch
    from safetensors.torch import save_file

    import openseek
    from openseek import BUNDLED_MODEL
    from openseek.model import Transformer
    from openseek.model.weights import hf_names

    if (path / "model.safetensors.index.json").exists():
        print(f"{path}: already written")
        return
    cfg = openseek.config.preset("v2-lite")
    with torch.device("meta"):
        model = Transformer(cfg)
    params = model.state_dict()
    shapes = {hf: tuple(params[native].shape[1:] if j is not None else params[native].shape)
              for hf, (native, j) in hf_names(model).items()}  # the hub's names: one tensor per expert
    del model
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards, shard, size, total, t0 = [], {}, 0, 0, time.perf_counter()

    def flush() -> None:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        shards.append((name, list(shard)))
        print(f"  {name}: {size / 2**30:.1f} GiB, {time.perf_counter() - t0:.0f} s", flush=True)

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:  # fp32 draws cast down: torch has no bf16 normal_ on CPU generators' fast path
            t = torch.empty(shape).normal_(0, INIT_STD, generator=g).to(torch.bfloat16)
        if size and size + t.nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[name], size, total = t, size + t.nbytes, total + t.nbytes
    flush()
    n = len(shards)
    weight_map = {}
    for i, (name, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (tmp / name).rename(tmp / final)
        weight_map |= dict.fromkeys(names, final)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / f).write_bytes((BUNDLED_MODEL / f).read_bytes())
    tmp.rename(path)
    print(f"wrote {path}: {sum(1 for _ in shapes)} tensors, {total / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")


def child_peak_gib(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS GiB of the command, its seconds, its last output line)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, which Popen.wait would not give
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    return usage.ru_maxrss / 2**20, time.perf_counter() - t, lines[-1] if lines else ""  # ru_maxrss in kB


def run(path: Path, formats: list[str], new_tokens: int) -> None:
    print(f"{path}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 1e9:.1f} GB of safetensors; "
          f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    rows = []
    for fmt in formats:
        generate = ["openseek", "generate", "--model", str(path), "--quantization", fmt, "--max-tokens", "8",
                    "--temperature", "0", "def f(x):"]
        peak, seconds, _ = child_peak_gib(generate)
        print(f"$ {' '.join(generate[:-1])} 'def f(x):'\n  peak RSS {peak:.2f} GiB, {seconds:.0f} s", flush=True)
        _, _, line = child_peak_gib([sys.executable, "-c", TIMING, str(path), fmt, str(new_tokens)])
        fields = dict(kv.split("=") for kv in line.removeprefix("RESULT ").split())
        print(f"  timing process: {fields}", flush=True)
        rows.append((fmt, peak, float(fields["hwm_gib"]), float(fields["load_s"]), float(fields["tok_s"])))
    print("\n| weights | `openseek generate` peak RSS GiB | timing process peak RSS GiB | load s | decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for fmt, peak, hwm, load_s, tok_s in rows:
        print(f"| {fmt} | {peak:.2f} | {hwm:.2f} | {load_s:.0f} | {tok_s:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["write", "run"])
    p.add_argument("--path", type=Path, default=BENCH_DIR / "v2-lite-real")
    p.add_argument("--formats", default="int8,int4")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    if args.command == "write":
        write(args.path)
    else:
        run(args.path, [f for f in args.formats.split(",") if f], args.new_tokens)


if __name__ == "__main__":
    main()
