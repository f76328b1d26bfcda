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
  echo "=== $s $(date +%T)"
  case $s in
    tests) timeout 240 python3 -m pytest -q -x tests/kernels tests/patch/test_fused_loss.py tests/patch/test_fast_paths.py -k "not triton or llama" -p no:cacheprovider 2>&1 | tail -15 ;;
    kernels) timeout 300 python3 scripts/gpu_kernel_check.py --no-compile 2>&1 | tail -25 ;;
    lora) [ -f scripts/gpu_lora_check.py ] && timeout 240 python3 scripts/gpu_lora_check.py 2>&1 | tail -20 ;;
    offload) timeout 300 python3 scripts/gpu_offload_check.py 2>&1 | tail -15 ;;
    bench) timeout 420 python3 -m fastlm.bench.train --shape llama-3.2-1b --batch 4 --seq-len 2048 --steps 8 2>&1 | tee "$OUT/bench_1b_16.txt" | tail -20 ;;
    bench4) timeout 420 python3 -m fastlm.bench.train --shape llama-3.2-1b --bits 4 --batch 4 --seq-len 2048 --steps 8 2>&1 | tee "$OUT/bench_1b_4.txt" | tail -20 ;;
  esac
done
