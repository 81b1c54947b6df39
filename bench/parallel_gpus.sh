#!/usr/bin/env bash
# Runs several benchmark commands at once, one per GPU, each with its own log under $OUT.
# Usage: OUT=dir bash bench/parallel_gpus.sh "cmd for gpu0" "cmd for gpu1" ...
# Each command sees only its GPU (CUDA_VISIBLE_DEVICES) and gets $JSON, a path for its table.
set -u
out=${OUT:-bench_out}
mkdir -p "$out"
pids=()
gpu=0
for cmd in "$@"; do
  ( export CUDA_VISIBLE_DEVICES=$gpu JSON="$out/gpu$gpu.json"; eval "$cmd" ) > "$out/gpu$gpu.log" 2>&1 &
  pids+=($!)
  gpu=$((gpu + 1))
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for ((i = 0; i < gpu; i++)); do echo "=== gpu$i ==="; grep -A30 -E '^(gpt2|llama|tiny)-?.*batch' "$out/gpu$i.log" || tail -n 15 "$out/gpu$i.log"; done
exit $status
