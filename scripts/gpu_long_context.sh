#!/usr/bin/env bash
# One long-context training step that outlasts the device tool's 10-minute command (issue 7's 8B NF4 >= 400k tokens).
#   bash scripts/gpu_long_context.sh start TOKENS   # starts the step in its own process session, then waits
#   bash scripts/gpu_long_context.sh wait           # waits on it again (call within the machine's idle time)
# The step runs under setsid so that it outlives the command that started it (the device tool keeps such a process
# running until the machine goes back); its log, exit status and a host-memory trace (every 5 s) are kept in
# /tmp/fastlm_long and copied to $OUT each time. Each call waits at most WAIT_S seconds (default 570).
set -u
mode=${1:?start TOKENS | wait}
dir=/tmp/fastlm_long
wait_s=${WAIT_S:-570}
if [ "$mode" = start ]; then
  tokens=${2:?tokens}
  rm -rf "$dir" && mkdir -p "$dir"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  setsid bash -c "
    ( while [ ! -f $dir/rc ]; do echo \"\$(date +%s) \$(free -m | awk '/Mem:/{print \$3}')\" >> $dir/host_mb; sleep 5; done ) &
    python -m fastlm.bench.train --shape llama-3.1-8b --bits 4 --batch 1 --seq-len $tokens --steps 1 --warmup 0 \
      --sides fastlm --offload-embedding --tiled-mlp > $dir/log 2>&1
    echo \$? > $dir/rc" < /dev/null > /dev/null 2>&1 &
  date +%s > "$dir/started"
fi
t0=$(date +%s)
while [ ! -f "$dir/rc" ] && [ $(( $(date +%s) - t0 )) -lt "$wait_s" ]; do sleep 5; done
mkdir -p "${OUT:-/tmp/out}"
cp "$dir"/* "${OUT:-/tmp/out}/" 2>/dev/null
elapsed=$(( $(date +%s) - $(cat "$dir/started") ))
peak_host=$(awk '{ if ($2 > m) m = $2 } END { print m }' "$dir/host_mb" 2>/dev/null)
echo "--- log tail"
tail -n 25 "$dir/log"
echo "--- elapsed ${elapsed}s since start; host used peak ${peak_host} MB; rc: $(cat "$dir/rc" 2>/dev/null || echo running)"
