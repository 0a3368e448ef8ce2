# The parallel checks on a device machine: tests/test_parallel.py and bench/parallel.py pinned to 2 idle cores,
# and CUDA (NCCL needs one device per rank: with one GPU, tensor_parallel_size=2 must be refused clearly).
set -x
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
python -c "import torch, transformers; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count(), transformers.__version__)"
nproc
taskset -c 0,1 timeout 200 python -m pytest -q tests/test_parallel.py --durations=8 -p no:cacheprovider 2>&1 | tail -15
(cd bench && taskset -c 0,1 timeout 200 python parallel.py 2>&1 | tail -8) | tee $OUT/parallel_idle_2cores.txt
python - <<'PY' 2>&1 | tail -8
import sys, torch
sys.path.insert(0, "tests")
from conftest import build_reference, save_reference
from pathlib import Path
from openseek import LLM, SamplingParams
p = save_reference(build_reference("v2"), Path("/tmp/v2cuda"))
P = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ps = [{"prompt_token_ids": list(range(3 + i, 20 + 2 * i))} for i in range(8)]
cpu = [o.outputs[0].token_ids for o in LLM(p, block_size=4).generate(ps, P)]
gpu = [o.outputs[0].token_ids for o in LLM(p, block_size=4, device="cuda").generate(ps, P)]
print("cuda tp=1 same tokens as cpu:", cpu == gpu)
try:
    LLM(p, device="cuda", tensor_parallel_size=2)
except ValueError as e:
    print("cuda tp=2 on", torch.cuda.device_count(), "device(s):", e)
PY
