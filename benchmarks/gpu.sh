#!/usr/bin/env bash
# The model-scale benchmarks on one CUDA GPU in one command, within 8 minutes (issue 30, item 7):
#   1. benchmarks/models.py: Conv-4 BN MAML against higher and TorchOpt, eager at T = 5, 20 and 50, and
#      hf.compile(segment=1) batched over the tasks, one task at a time (chunk_size=1), and with
#      mode="reduce-overhead" (CUDA graphs) at T = 5;
#   2. benchmarks/hyperdistill_costs.py: HyperDistill's Table 3 at the paper's shapes (T = 100).
# Each part has its own time limit, so a slow part cannot eat the other's; the tables go to stdout and
# to results/gpu/. Usage: bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=results/gpu
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
eager=(hf.unroll "hf.unroll(chunk_size=1)" hf.fomaml "higher (loop over tasks)" "TorchOpt (loop over tasks)")
compiled=("hf.compile(segment=1)" "hf.compile(segment=1, chunk_size=1)" "hf.compile(segment=1, mode=reduce-overhead)")
timeout 170 python benchmarks/models.py --device cuda --threads 8 --steps 5 20 50 --routes "${eager[@]}" | tee "$out/models_eager.md"
timeout 220 python benchmarks/models.py --device cuda --threads 8 --steps 5 --routes hf.unroll "${compiled[@]}" | tee "$out/models_compiled.md"
timeout 90 python benchmarks/hyperdistill_costs.py --device cuda | tee "$out/hyperdistill_costs.md"
