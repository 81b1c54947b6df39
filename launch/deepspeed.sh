#!/usr/bin/env bash
# Pretraining through DeepSpeed's own launcher, on one machine or many: preflight, then
#   deepspeed [--hostfile H [--include S|--exclude S]] [--num_nodes N] [--num_gpus G] [--master_addr A]
#             --master_port P --launcher L [--launcher_args ...] [--no_ssh --node_rank R] --module pretrain.train ARGS
#
#   HOSTFILE=launch/hostfile launch/deepspeed.sh --config llama-1b --set run.dir=/shared/runs/llama-1b
#   NUM_GPUS=8 launch/deepspeed.sh --config gpt2-124m          # this machine only
#
# ARGS are `lmforge train`'s (--config, --set). Launcher settings come from the environment:
#   HOSTFILE        'HOST slots=N' lines (launch/hostfile.example); unset: this machine's NUM_GPUS GPUs
#   INCLUDE EXCLUDE NUM_NODES NUM_GPUS   DeepSpeed's resource filters
#   MASTER_ADDR     first host's address as the others reach it (unset: DeepSpeed asks `ssh HOST hostname -I`)
#   MASTER_PORT     default 29500
#   LAUNCHER        pdsh (default), openmpi, mpich, impi, mvapich or slurm; LAUNCHER_ARGS: its own options
#   NODE_RANK       start only this node's ranks, without ssh (run once per node, e.g. by srun)
#   EXPORT_ENV      more variable names for every node; PATH, LD_LIBRARY_PATH, CUDA_HOME, TORCH_CUDA_ARCH_LIST,
#                   ... always go, through RUN_DIR/.deepspeed_env (merged with your ~/.deepspeed_env)
#   DEEPSPEED_ARGS  any other runner options, e.g. "--ssh_port 2222 --force_multi"
#   PREFLIGHT_ARGS  e.g. "--skip-checksums" for a corpus too large to re-hash at every launch
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
# `python -m pretrain.train` on every rank: the checkout is importable (DeepSpeed's runner forwards PYTHON*)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

hosts=()
[ -n "${HOSTFILE:-}" ] && hosts+=(--hostfile "$HOSTFILE")
[ -n "${INCLUDE:-}" ] && hosts+=(--include "$INCLUDE")
[ -n "${EXCLUDE:-}" ] && hosts+=(--exclude "$EXCLUDE")
[ -n "${NUM_NODES:-}" ] && hosts+=(--num_nodes "$NUM_NODES")
[ -n "${NUM_GPUS:-}" ] && hosts+=(--num_gpus "$NUM_GPUS")
size=()
[ -z "${HOSTFILE:-}" ] && size=(--world-size "${NUM_GPUS:?set HOSTFILE (multi-node) or NUM_GPUS (this machine)}")
exports=()
for name in ${EXPORT_ENV:-}; do exports+=(--export "$name"); done
read -r -a preflight_args <<< "${PREFLIGHT_ARGS:-}"
read -r -a deepspeed_args <<< "${DEEPSPEED_ARGS:-}"

# exit 2 here with one line per problem; otherwise the summary (stderr) and export lines (stdout)
exports_sh=$(python -m lmforge.cli preflight "$@" "${hosts[@]}" "${size[@]}" "${preflight_args[@]}" \
  --deepspeed-env "${exports[@]}" --print-exports)
eval "$exports_sh"

set -x
exec deepspeed "${hosts[@]}" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --master_port "${MASTER_PORT:-29500}" \
  --launcher "${LAUNCHER:-pdsh}" ${LAUNCHER_ARGS:+--launcher_args "$LAUNCHER_ARGS"} \
  ${NODE_RANK:+--no_ssh --node_rank "$NODE_RANK"} "${deepspeed_args[@]}" --module pretrain.train "$@"
