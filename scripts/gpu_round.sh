#!/usr/bin/env bash
# One GPU round through the device tool: compiled-kernel tests, kernel check, fused LoRA check, training bench.
# usage (on the GPU machine, repo root): bash scripts/gpu_round.sh [steps...]   steps: tests kernels lora bench bench4 offload
set -u
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-tests kernels lora bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
for s in $steps; do
  echo "=== $s $(date +%T)" | tee -a "$OUT/summary.txt"
  case $s in
    tests) timeout 240 python3 -m pytest -q -x tests/kernels tests/patch/test_fused_loss.py tests/patch tests/arch -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -5 ;;
    kernels) timeout 300 python3 scripts/gpu_kernel_check.py --no-compile > "$OUT/kernels.txt" 2>&1; grep -B14 '^{"device' "$OUT/kernels.txt" | head -15 ;;
    lora) [ -f scripts/gpu_lora_check.py ] && timeout 240 python3 scripts/gpu_lora_check.py 2>&1 | tee "$OUT/lora.txt" | tail -14 ;;
    offload) timeout 300 python3 scripts/gpu_offload_check.py 2>&1 | tee "$OUT/offload.txt" | tail -10 ;;
    bench) timeout 420 python3 -m fastlm.bench.train --shape llama-3.2-1b --batch 4 --seq-len 2048 --steps 8 2>&1 | tee "$OUT/bench_1b_16.txt" | grep -v "^ " | tail -8 ;;
    pf) timeout 420 python3 -m fastlm.bench.train --shape llama-3.2-1b --padding-free --batch 4 --seq-len 2048 --steps 8 2>&1 | tee "$OUT/bench_1b_pf.txt" | grep -v "^ " | tail -8 ;;
    bench8) timeout 580 python3 -m fastlm.bench.train --shape llama-3.1-8b --bits 4 --batch 2 --seq-len 2048 --steps 5 --warmup 1 2>&1 | tee "$OUT/bench_8b_4.txt" | grep -v "^ " | tail -8 ;;
    bench4) timeout 420 python3 -m fastlm.bench.train --shape llama-3.2-1b --bits 4 --batch 4 --seq-len 2048 --steps 8 2>&1 | tee "$OUT/bench_1b_4.txt" | grep -v "^ " | tail -8 ;;
  esac
done
