"""Batch-1 greedy CPU decode of openseek in each weight format (fp32, bf16, int8, int4), against llama.cpp's
f32 / f16 / q8_0 / q4_0 where llama-cpp-python is importable (skipped with a note otherwise).

    python bench/cpu_decode.py [--models bundled,bench] [--new-tokens 32] [--repeats 3] [--threads N]

Every format of a model is loaded in this process and timed in turn within each repeat (so load from other
processes falls on all alike); decode tok/s = (N - 1) / (time to N tokens - time to 1 token), prefill excluded.
Also reported: the bytes the weights hold, the peak RSS of loading each format in a fresh process, and each
run's read rate (bytes a decode token reads / its time) as a fraction of a streaming read measured in the same run.
int8 and int4 keep the rest of the model (embedding, norms, attention, cache) in float32, as the CLI runs the
bundled model, and lm_head too unless "+head" (llama.cpp's q8_0 / q4_0 quantise it); int4 uses the largest group
(128, 64 or 32) that divides every weight's input dimension.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import BENCH_CHECKPOINT, machine_line, markdown_table, time_interleaved

import openseek
from openseek import BUNDLED_MODEL
from openseek.model.quant import QuantizedWeight

FORMATS = {  # name: (dtype of the rest, quantization, lm_head quantised too)
    "fp32": (torch.float32, None, False), "bf16": (torch.bfloat16, None, False),
    "int8": (torch.float32, "int8", False), "int4": (torch.float32, "int4", False),
    "int8+head": (torch.float32, "int8", True), "int4+head": (torch.float32, "int4", True)}
LLAMA_CPP = {"fp32": "f32", "bf16": "f16", "int8+head": "q8_0", "int4+head": "q4_0"}  # llama.cpp's counterparts
PROMPT_LEN = {"bundled": 64, "bench": 256}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bundled,bench", help="bundled and/or bench (the bench checkpoint, if built)")
    p.add_argument("--formats", default="fp32,bf16,int8,int4,int8+head,int4+head",
                   help=f"a subset of {','.join(FORMATS)}")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per format (the fastest is kept)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gguf-dir", default=None, help="llama.cpp: a folder of MODEL-{f32,f16,q8_0,q4_0}.gguf files")
    p.add_argument("--no-load-rss", action="store_true", help="skip the per-format load subprocesses")
    p.add_argument("--compile", action="store_true", help="also time each format with EngineConfig.compile "
                   "(rows 'FORMAT compiled'; the first generate of each compiles, outside the timing)")
    return p.parse_args()


def model_path(name: str) -> Path | None:
    path = BUNDLED_MODEL if name == "bundled" else BENCH_CHECKPOINT
    return path if (path / "config.json").exists() else None


def int4_group(path: Path) -> int:
    """The largest int4 group size dividing every matmul weight's input dimension."""
    cfg = openseek.ModelConfig.from_file(path)
    dims = [cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.kv_lora_rank,
            cfg.num_attention_heads * cfg.v_head_dim] + ([cfg.q_lora_rank] if cfg.q_lora_rank else [])
    return next(g for g in (128, 64, 32) if all(d % g == 0 for d in dims))


def load(path: Path, fmt: str, max_model_len: int, compile: bool = False) -> openseek.LLM:
    dtype, quantization, head = FORMATS[fmt.removesuffix(" compiled")]
    model = openseek.load_pretrained(path, dtype=dtype, quantization=quantization, group_size=int4_group(path),
                                     quantize_head=head)
    return openseek.LLM(model, max_num_seqs=1, max_model_len=max_model_len, enable_prefix_caching=False,
                        compile=compile)


def weight_bytes(model: torch.nn.Module, compiled: bool) -> tuple[int, int]:
    """(bytes the weights hold, bytes one decode token reads: routed experts at K/E, the embedding one row, MLA's
    absorbed weights as the decode path reads them: compiled, a quantised model's int copies)."""
    cfg, held, read = model.config, 0, 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.complex64 or name.endswith(("inv_freq", "w_uk", "w_uv_t")):
            continue
        n = t.numel() * t.element_size()
        held += n
        if name.startswith("embed."):
            n = n // cfg.vocab_size
        elif ".ffn.experts." in name:
            n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
        read += n
    for m in model.modules():  # the absorbed W_UK / W_UV^T are read instead of wkv_b at decode
        if getattr(m, "w_uk", None) is not None:
            ints = compiled and m.w_uk_int8 is not None
            parts = (m.w_uk_int8, m.w_uk_scale, m.w_uv_int8, m.w_uv_scale) if ints else (m.w_uk, m.w_uv_t)
            read += sum(t.numel() * t.element_size() for t in parts)
    return held, read


def load_rss_gib(path: Path, fmt: str | None) -> float:
    """Peak RSS of a fresh process that imports openseek and loads the model in this format (None: imports only).
    VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, which holds every format loaded here."""
    code = "import sys, torch, openseek\n"
    if fmt is not None:
        dtype, quantization, head = FORMATS[fmt]
        code += (f"openseek.load_pretrained(sys.argv[1], dtype=torch.{str(dtype).removeprefix('torch.')}, "
                 f"quantization={quantization!r}, group_size={int4_group(path)}, quantize_head={head})\n")
    code += "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20  # kB


def stream_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s a full-vector reduction streams from memory (the pattern decode's weight reads follow)."""
    x = torch.ones(int(gib * 2**30) // 4)
    t = time_interleaved({"sum": lambda: x.sum()}, repeats=5).pop("sum")
    return x.numel() * 4 / t.min_s


def openseek_rows(name: str, path: Path, formats: list[str], args: argparse.Namespace) -> list[list[str]]:
    plen = PROMPT_LEN[name]
    max_len = -(-(plen + args.new_tokens) // 16) * 16  # whole blocks
    llms = {fmt: load(path, fmt, max_len) for fmt in formats}
    if args.compile:
        llms |= {f"{fmt} compiled": load(path, fmt, max_len, compile=True) for fmt in formats}
        formats = list(llms)
    vocab = llms[formats[0]].llm_engine.model.config.vocab_size
    prompt = {"prompt_token_ids": torch.randint(0, vocab, (plen,), generator=torch.Generator().manual_seed(0))
              .tolist()}

    def run(fmt: str, k: int):
        params = openseek.SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
        return lambda: llms[fmt].generate(prompt, params)

    fns = {(fmt, k): run(fmt, k) for fmt in formats for k in (1, args.new_tokens)}
    bandwidth = stream_bandwidth()
    times = time_interleaved(fns, repeats=args.repeats)
    bandwidth = max(bandwidth, stream_bandwidth())  # before and after: the better of the two
    rows = []
    for fmt in formats:
        per_token = (times[fmt, args.new_tokens].min_s - times[fmt, 1].min_s) / (args.new_tokens - 1)
        held, read = weight_bytes(llms[fmt].llm_engine.model, compiled=fmt.endswith("compiled"))
        rss = float("nan") if args.no_load_rss or fmt.endswith("compiled") else load_rss_gib(path, fmt)
        rows.append([name, f"openseek {fmt}", f"{1 / per_token:.1f}", f"{held / 2**20:.0f}", f"{rss:.2f}",
                     f"{read / per_token / 1e9:.1f}", f"{100 * read / per_token / bandwidth:.0f}%"])
    imports = "" if args.no_load_rss else f", peak RSS of the imports alone {load_rss_gib(path, None):.2f} GiB"
    print(f"{name}: streaming read {bandwidth / 1e9:.1f} GB/s, prompt {plen}, {args.new_tokens} new tokens{imports}")
    return rows


def llama_cpp_rows(name: str, formats: list[str], args: argparse.Namespace) -> list[list[str]]:
    """llama.cpp's counterpart of each format, from --gguf-dir; [] with a note when it cannot run."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp skipped: llama_cpp is not importable (../shared/peers/llamacpp.sh builds "
              "llama-cpp-python and converts the weights)")
        return []
    rows = []
    for fmt in [f for f in formats if f in LLAMA_CPP]:
        gguf = Path(args.gguf_dir or ".") / f"{name}-{LLAMA_CPP[fmt]}.gguf"
        if not gguf.exists():
            print(f"llama.cpp {LLAMA_CPP[fmt]} skipped: {gguf} not found")
            continue
        llm = llama_cpp.Llama(str(gguf), n_threads=args.threads, n_ctx=PROMPT_LEN[name] + args.new_tokens + 8,
                              verbose=False)
        prompt = torch.randint(0, llm.n_vocab(), (PROMPT_LEN[name],),
                               generator=torch.Generator().manual_seed(0)).tolist()

        def gen(k: int, llm=llm, prompt=prompt):
            return lambda: llm(prompt, max_tokens=k, temperature=0.0, top_k=1)

        times = time_interleaved({1: gen(1), args.new_tokens: gen(args.new_tokens)}, repeats=args.repeats)
        per_token = (times[args.new_tokens].min_s - times[1].min_s) / (args.new_tokens - 1)
        rows.append([name, f"llama.cpp {LLAMA_CPP[fmt]}", f"{1 / per_token:.1f}", f"{gguf.stat().st_size / 2**20:.0f}",
                     "", "", ""])
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # each compiled engine is a cache entry of the one decode function: past dynamo's default of 8 per function,
    # the rest would silently decode eagerly
    torch._dynamo.config.recompile_limit = 64
    formats = [f for f in args.formats.split(",") if f]
    if unknown := set(formats) - set(FORMATS):
        raise SystemExit(f"unknown formats {sorted(unknown)}: allowed {', '.join(FORMATS)}")
    print(machine_line())
    rows = []
    for name in args.models.split(","):
        path = model_path(name)
        if path is None:
            print(f"{name}: no checkpoint (bench/throughput.py builds the bench checkpoint), skipped")
            continue
        rows += openseek_rows(name, path, formats, args) + llama_cpp_rows(name, formats, args)
    print()
    print(markdown_table(["model", "run", "decode tok/s", "weights MiB", "load peak RSS GiB", "read GB/s",
                          "of stream"], rows))
    print(json.dumps({"machine": machine_line(), "rows": rows}))


if __name__ == "__main__":
    main()
