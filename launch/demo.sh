#!/usr/bin/env bash
# The main job end to end on the default corpus (the Python standard library's .py files):
# tokenizer -> shards -> train -> eval -> sample -> export. Rerunning reuses what is complete
# (identical tokenizer, complete shards) and resumes training from the run directory.
# Overrides: DEMO_CONFIG (preset, default tiny), DEMO_VOCAB (default 8192), DEMO_RUN (run dir).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${DEMO_CONFIG:-tiny}
vocab=${DEMO_VOCAB:-8192}
run=${DEMO_RUN:-runs/demo-$config}

step() { printf '\n== %s\n' "$*"; }

step "1/6 tokenizer: sentencepiece BPE, $vocab pieces, on the standard library"
lmforge prep tokenizer --input stdlib --vocab-size "$vocab" --output data/tokenizer
step "2/6 shards: Megatron .bin/.idx with a checksummed manifest"
lmforge prep shards --input stdlib --tokenizer data/tokenizer/tokenizer.model --output data/stdlib
step "3/6 train: preset '$config' with DeepSpeed (run dir $run)"
lmforge train --config "$config" --set run.dir="$run" --set data.path="[data/stdlib]"
lmforge plot "$run"
step "4/6 eval: held-out loss, perplexity, bits per byte"
lmforge eval --checkpoint "$run" --data data/stdlib --split valid
step "5/6 sample"
lmforge generate --checkpoint "$run" --prompt "def " --max-new-tokens 80 --seed 0
step "6/6 export: Hugging Face transformers format"
lmforge export-hf --checkpoint "$run" --output "${run}-hf" --overwrite  # beside the run: never inside an input
printf '\ndone: metrics %s/metrics.jsonl, plot %s/loss.png, HF model %s-hf\n' "$run" "$run" "$run"
