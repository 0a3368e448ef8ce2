# The checks that need the device machine (one H200, 16 idle cores), in one run (~5 min):
#   1. bench/parallel.py pinned to 2 idle cores: 1 process x 2 threads against 2 processes x 1 thread (issue 18),
#      which the shared 2-core machines cannot measure without contention;
#   2. CUDA: the engine's greedy tokens on the GPU equal the CPU's (V2-shaped tiny checkpoint), eager and
#      compiled (EngineConfig.compile: inductor's CUDA code), and a tensor_parallel_size beyond the devices is refused;
#   3. CUDA decode tok/s of the bundled model, eager against compiled, batch 1 and 16.
# Usage (device tool): bash bench/device_checks.sh   (writes $OUT/device_checks.txt)
set -x
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_out}; mkdir -p $OUT
exec > >(tee $OUT/device_checks.txt) 2>&1
python -c "import torch, transformers; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count(), transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv
(cd bench && taskset -c 0,1 timeout 150 python parallel.py 2>&1 | tail -8)
timeout 240 python - <<'PY' 2>&1 | grep -v Warning
import os, sys, time, torch
DEV = os.environ.get("DEV", "cuda")  # DEV=cpu tries the script here
sys.path.insert(0, "tests")
from conftest import build_reference, save_reference
from pathlib import Path
import openseek
from openseek import LLM, SamplingParams, BUNDLED_MODEL
p = save_reference(build_reference("v2"), Path("/tmp/v2cuda"))
P = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ps = [{"prompt_token_ids": list(range(3 + i, 20 + 2 * i))} for i in range(8)]
cpu = [o.outputs[0].token_ids for o in LLM(p, block_size=4).generate(ps, P)]
gpu = [o.outputs[0].token_ids for o in LLM(p, block_size=4, device=DEV).generate(ps, P)]
print("cuda eager: same tokens as cpu:", cpu == gpu)
t = time.perf_counter()
gpu_c = [o.outputs[0].token_ids for o in LLM(p, block_size=4, device=DEV, compile=True).generate(ps, P)]
print(f"cuda compiled: same tokens as cpu: {cpu == gpu_c} (first generate, compiling: {time.perf_counter() - t:.0f} s)")
try:
    LLM(p, device=DEV, tensor_parallel_size=torch.cuda.device_count() + 1)
except ValueError as e:
    print("tensor_parallel_size beyond the devices:", e)
rows = []
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
sizes = [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 16), (torch.bfloat16, 16)]
if os.environ.get("QUICK"):
    sizes = [(torch.float32, 1)]
for dtype, batch in sizes:
    for compile in (False, True):
        llm = LLM(BUNDLED_MODEL, dtype=dtype, device=DEV, compile=compile, max_num_seqs=batch,
                  max_model_len=256, enable_prefix_caching=False)
        prompts = [{"prompt_token_ids": list(range(10 + i, 74 + i))} for i in range(batch)]
        def gen(k):
            sync(); t = time.perf_counter()
            out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
            sync()
            return time.perf_counter() - t, [o.outputs[0].token_ids for o in out]
        gen(8); gen(64)  # warm-up (and compile)
        (t1, _), (t64, toks) = min(gen(1) for _ in range(3)), min(gen(64) for _ in range(3))
        rows.append((str(dtype)[6:], batch, "compiled" if compile else "eager", batch * 63 / (t64 - t1), toks))
print("| dtype | batch | decode | tok/s |\n|---|---:|---|---:|")
for d, b, c, tps, _ in rows:
    print(f"| {d} | {b} | {c} | {tps:.0f} |")
for i in range(0, len(rows), 2):
    print(rows[i][:3], "compiled gives the eager greedy tokens:", rows[i][4] == rows[i + 1][4])
PY
