# shellcheck shell=bash
# Sourced by the sbatch scripts of launch/slurm/: the steps every SLURM launch shares.
# Not a job script itself.

# The checkout to run from: LMFORGE_ROOT, else the directory sbatch was called in (SLURM copies
# the job script elsewhere, so its own path says nothing). Activates .venv when there is one.
lmforge_enter_checkout() {
  cd "${LMFORGE_ROOT:-$SLURM_SUBMIT_DIR}" || exit 2
  if [ ! -f pretrain/train.py ]; then
    echo "error: $PWD is not an lmforge checkout; submit from its root or set LMFORGE_ROOT" >&2
    exit 2
  fi
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# Rank 0 listens on the allocation's first node; the port is derived from the job id so jobs
# sharing a node do not collide. srun passes both to every task.
lmforge_master_address() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: master $MASTER_ADDR:$MASTER_PORT" \
       "(restart ${SLURM_RESTART_COUNT:-0})"
}

# `lmforge preflight "$@"` before any GPU work; exits 2 on a problem, exports TORCH_CUDA_ARCH_LIST.
lmforge_preflight() {
  local exports_sh extra_args
  read -r -a extra_args <<< "${PREFLIGHT_ARGS:-}"  # e.g. PREFLIGHT_ARGS="--skip-checksums"
  exports_sh=$(python -m lmforge.cli preflight "$@" "${extra_args[@]}" --print-exports) || exit $?
  eval "$exports_sh"
}

# Runs "$@" (an srun step) in the background. The USR1 that `#SBATCH --signal=B:USR1@SECONDS`
# sends this shell before the time limit goes on to the step (srun forwards it to its tasks),
# where training saves a checkpoint at the next step boundary and exits 0; the job is then
# requeued (`#SBATCH --requeue`) and its next start resumes from run.dir.
lmforge_run_step() {
  local step status signals=0 seen
  "$@" &
  step=$!
  trap 'echo "SIGUSR1: time limit near, asking the ranks to checkpoint and stop"; signals=$((signals + 1)); kill -USR1 "$step"' USR1
  while :; do  # a trapped signal ends `wait` early: wait again until the step's own status comes
    seen=$signals status=0
    wait "$step" || status=$?
    [ "$seen" = "$signals" ] && break
  done
  trap - USR1
  if [ "$signals" -gt 0 ] && [ "$status" = 0 ]; then
    echo "checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
