#!/usr/bin/env bash
# Weak scaling of lmforge's real training path on one node through DeepSpeed's launcher:
# the same per-GPU micro-batch on 1, 2, 4 ... GPUs; tokens/s per GPU at N over at 1.
# Usage: bash bench/scaling.sh PRESET DS_JSON "1 2 4" [extra --set args...]
# Needs shards at data/stdlib (lmforge prep shards). Writes $OUT/scaling_<preset>.txt.
set -u
preset=${1:-llama-1b}; ds_json=${2:-ds_configs/zero2.json}; counts=${3:-"1 2 4"}; shift 3 || true
out=${OUT:-bench_out}; mkdir -p "$out"
table="$out/scaling_${preset}.txt"
echo "preset $preset, $ds_json, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$table"
printf '%-5s %12s %14s %10s %8s %9s\n' gpus tok/s tok/s/gpu efficiency mfu mem_gb >> "$table"
base=""
for n in $counts; do
  run=/dev/shm/lmforge_scaling_${preset}_$n
  rm -rf "$run"
  deepspeed --num_gpus "$n" --module pretrain.train --config "$preset" --set run.dir="$run" \
    --set deepspeed.config="$ds_json" --set train.max_steps=40 --set train.warmup_steps=10 --set run.log_interval=10 \
    --set run.progress_bar=false --set train.eval_batches=1 "$@" > "$out/scaling_${preset}_$n.log" 2>&1
  line=$(grep '"loss"' "$run/metrics.jsonl" 2>/dev/null | tail -n 1)
  if [ -z "$line" ]; then echo "$n failed: see scaling_${preset}_$n.log" >> "$table"; continue; fi
  python3 - "$n" "$line" "${base:-0}" >> "$table" <<'PY'
import json, sys
n, rec, base = int(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
per_gpu = rec["tokens_per_second"] / n
eff = per_gpu / base if base else 1.0
print(f"{n:<5} {rec['tokens_per_second']:>12.0f} {per_gpu:>14.0f} {eff:>10.1%} {rec['mfu'] or 0:>8.1%} {rec['memory_gb']:>9.1f}")
PY
  [ -z "$base" ] && base=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tokens_per_second'])" "$line")
  rm -rf "$run"
done
cat "$table"
