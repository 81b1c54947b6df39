#!/usr/bin/env bash
# One node's part of multi_node_deepspeed.sbatch (srun runs it once per node): writes the allocation
# as a DeepSpeed hostfile, `NODE slots=GPUS` per node, and starts DeepSpeed's launcher for this
# node's ranks through launch/deepspeed.sh (NODE_RANK set: --no_ssh --node_rank).
set -euo pipefail
hostfile=${TMPDIR:-/tmp}/lmforge-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$SLURM_GPUS_ON_NODE/" > "$hostfile"
# The batch shell has verified the data already; the node's preflight checks the rest.
export PREFLIGHT_ARGS="${PREFLIGHT_ARGS:-} --skip-checksums"
# Only the ranks act on USR1 (checkpoint and stop); DeepSpeed's launcher would die of it.
trap '' USR1
HOSTFILE=$hostfile NODE_RANK=$SLURM_NODEID exec launch/deepspeed.sh "$@"
