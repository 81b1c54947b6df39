#!/usr/bin/env bash
# Smoke test of one machine: preflight, a few hundred steps of a small preset on one GPU (the CPU when
# there is none), then tokens/s, MFU, peak memory and a sample. Exit 1 if the loss did not fall,
# 2 if preflight found a problem.
#   launch/smoke.sh                                   # gpt2-124m, 300 steps on GPU 0; tiny, 200 on CPU
#   launch/smoke.sh --config llama-350m --set train.max_steps=100
# Arguments are `lmforge train`'s and come after the defaults, so they win. Environment:
#   DATA     shard directory (default data/smoke, built from the Python standard library if missing)
#   RUN_DIR  default runs/smoke-DATE-TIME (a fresh run each time: a resumed one proves nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
data=${DATA:-data/smoke}
run_dir=${RUN_DIR:-runs/smoke-$(date +%Y%m%d-%H%M%S)}

if [ ! -f "$data/manifest.json" ]; then
  python -m lmforge.cli prep tokenizer --input stdlib --vocab-size 4096 --output "$data-tokenizer"
  python -m lmforge.cli prep shards --input stdlib --tokenizer "$data-tokenizer/tokenizer.model" --output "$data"
fi
if nvidia-smi -L >/dev/null 2>&1; then
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  preset=(--config gpt2-124m --set train.max_steps=300 --set train.warmup_steps=30)
else
  preset=(--config tiny --set train.max_steps=200)
fi
args=("${preset[@]}" --set "data.path=[$data]" --set "run.dir=$run_dir" --set run.log_interval=10
      --set train.save_interval=0 --set train.eval_interval=0 --set run.progress_bar=false "$@")

python -m lmforge.cli preflight "${args[@]}" --world-size 1
python -m lmforge.cli train "${args[@]}"
python -m launch.smoke_report "${args[@]}"
