#!/usr/bin/env bash
# The engine's GPU round through the device tool: parity checks, the generation bench, the profile.
# usage (on the GPU machine, repo root): bash scripts/gpu_engine_round.sh [steps...]
#   steps: check bench1b bench4 bench8b bench8b4 profile grpo export mlp nf4sweep overhead trainmem epilogue pdl
#   (not yet run on a GPU: export)
set -u
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-check bench1b}
for s in $steps; do
  echo "=== $s $(date +%T)" | tee -a "$OUT/summary.txt"
  case $s in
    check) timeout 300 python3 scripts/gpu_engine_check.py ${CHECK_ARGS:-} > "$OUT/check.txt" 2>&1; grep -v "^{" "$OUT/check.txt" | tail -12 | tee -a "$OUT/summary.txt" ;;
    bench1b) timeout 300 python3 -m fastlm.bench.generate --shape llama-3.2-1b --lora-rank 16 --hf-new-tokens 32 > "$OUT/bench1b.txt" 2>&1; grep -E "tokens/s|compile|^\{" "$OUT/bench1b.txt" | tee -a "$OUT/summary.txt" ;;
    bench4) timeout 240 python3 -m fastlm.bench.generate --shape llama-3.2-1b --lora-rank 0 --load-in-4bit --batches 1 --hf-new-tokens 32 > "$OUT/bench1b4.txt" 2>&1; grep -E "tokens/s|compile|^\{" "$OUT/bench1b4.txt" | tee -a "$OUT/summary.txt" ;;
    bench8b4) timeout 300 python3 -m fastlm.bench.generate --shape llama-3.1-8b --lora-rank 0 --load-in-4bit --batches 1 --hf-new-tokens 16 > "$OUT/bench8b4.txt" 2>&1; grep -E "tokens/s|compile|^\{" "$OUT/bench8b4.txt" | tee -a "$OUT/summary.txt" ;;
    bench8b) timeout 300 python3 -m fastlm.bench.generate --shape llama-3.1-8b --lora-rank 0 --batches 1 --hf-new-tokens 16 > "$OUT/bench8b.txt" 2>&1; grep -E "tokens/s|compile|^\{" "$OUT/bench8b.txt" | tee -a "$OUT/summary.txt" ;;
    profile) timeout 300 python3 scripts/gpu_engine_profile.py ${PROFILE_ARGS:---cases lora16,lora16+kernel,lora16+auto,nf4 --no-nf4-sweep} > "$OUT/profile.txt" 2>&1; tail -5 "$OUT/profile.txt" | head -4 | tee -a "$OUT/summary.txt" ;;
    grpo) timeout 240 python3 scripts/gpu_grpo_generation_check.py > "$OUT/grpo.txt" 2>&1; tail -6 "$OUT/grpo.txt" | tee -a "$OUT/summary.txt" ;;
    export) timeout 300 python3 scripts/gpu_export_check.py > "$OUT/export.txt" 2>&1; tail -8 "$OUT/export.txt" | tee -a "$OUT/summary.txt" ;;
    nf4sweep) timeout 300 python3 scripts/gpu_nf4_sweep.py > "$OUT/nf4sweep.txt" 2>&1; tail -14 "$OUT/nf4sweep.txt" | tee -a "$OUT/summary.txt" ;;
    overhead) timeout 240 python3 scripts/gpu_step_overhead.py > "$OUT/overhead.txt" 2>&1; tail -14 "$OUT/overhead.txt" | tee -a "$OUT/summary.txt" ;;
    trainmem) timeout 200 python3 scripts/gpu_train_memory.py --shape llama-3.2-1b --batch 4 --seq-len 2048 --warmup 2 > "$OUT/trainmem.txt" 2>&1; tail -30 "$OUT/trainmem.txt" | tee -a "$OUT/summary.txt" ;;
    epilogue) timeout 300 python3 scripts/gpu_epilogue_bench.py > "$OUT/epilogue.txt" 2>&1; tail -9 "$OUT/epilogue.txt" | tee -a "$OUT/summary.txt" ;;
    pdl) timeout 300 python3 scripts/gpu_pdl_check.py > "$OUT/pdl.txt" 2>&1; grep -v "^{" "$OUT/pdl.txt" | tail -32 | tee -a "$OUT/summary.txt" ;;
    mlp) timeout 240 python3 scripts/gpu_kernel_check.py --ops mlp_full_ft_llama,mlp_full_ft_gemma2 > "$OUT/mlp.txt" 2>&1; tail -6 "$OUT/mlp.txt" | tee -a "$OUT/summary.txt" ;;
  esac
done
