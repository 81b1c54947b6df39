"""What the launcher (torchrun/deepspeed, OpenMPI, MPICH/PMI, srun) says about this process, read from the
environment before any process group exists and before torch is imported."""
from __future__ import annotations

import os

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


def launcher_world_size() -> int:
    """The number of ranks the launcher says it started; 1 when started plainly."""
    for key in WORLD_SIZE_VARIABLES:
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def launcher_rank() -> int:
    """This process's rank as the launcher set it; 0 when started plainly."""
    for key in RANK_VARIABLES:
        if os.environ.get(key):
            return int(os.environ[key])
    return 0
