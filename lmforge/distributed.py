"""Process-group set-up and the few collective helpers the rest of lmforge asks for.

Works under every launcher users have: plain `python` (one rank), `torchrun`, `deepspeed`,
`srun` (SLURM_* variables), and `mpirun` (DeepSpeed's MPI discovery through mpi4py).
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch

from lmforge.launcher_env import launcher_rank, launcher_world_size  # noqa: F401 (lmforge.distributed's names)


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def normalise_cuda_arch_list() -> None:
    """DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST as numbers: '9.0a' -> '9.0'."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        parts = value.replace(";", " ").split()
        cleaned = []
        for part in parts:
            ptx = part.endswith("+PTX")
            number = part.removesuffix("+PTX").rstrip("abf")
            cleaned.append(number + ("+PTX" if ptx else ""))
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(cleaned))


def _adopt_launcher_environment() -> None:
    """Maps SLURM's variables to torch's, and gives a lone process a one-rank group."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "OMPI_COMM_WORLD_RANK" not in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))
    if "RANK" not in env and not mpi:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def comm_op_to_build() -> str | None:
    """The name of the op DeepSpeed will JIT-build as it starts the process group, else None: on a CPU its
    shared-memory communication op (deepspeed.comm.torch.build_shm_op), when neither installed with DeepSpeed
    nor yet built under the torch extensions folder (TORCH_EXTENSIONS_DIR): 33 s on 2 idle cores, 65 s on busy ones."""
    if torch.cuda.is_available():
        return None
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) or installed_ops.get(builder.name):
            return None
        built = os.path.join(_get_build_directory(builder.name, verbose=False), f"{builder.name}.so")
    except Exception:  # another DeepSpeed or torch: say nothing rather than guess
        return None
    return None if os.path.isfile(built) else builder.absolute_name()


def init_distributed(verb: str | None = None) -> DistributedInfo:
    """Creates the process group (nccl on GPU, gloo on CPU) and picks this rank's device. With `verb`
    (`lmforge VERB`), rank 0 first says when DeepSpeed is about to build an op (comm_op_to_build)."""
    import deepspeed
    import torch.distributed as dist

    normalise_cuda_arch_list()
    _adopt_launcher_environment()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        op = comm_op_to_build() if verb is not None and launcher_rank() == 0 else None
        if op is not None:
            print(f"lmforge {verb}: DeepSpeed builds {op} (once per TORCH_EXTENSIONS_DIR: "
                  "33 s on 2 cores)", flush=True)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is unchanged)."""
    import torch.distributed as dist

    out = value.detach().clone()
    if is_initialized() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy), queued on the device: nothing here waits for it."""
    import torch.distributed as dist

    out = value.detach().clone()
    if is_initialized() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not is_initialized() or world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shutdown() -> None:
    """Destroys the process group (without it gloo's threads abort the process at exit) and releases the
    run directory's lock once every rank is done (lmforge.run_lock)."""
    import torch.distributed as dist

    from lmforge import run_lock

    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    run_lock.release_all()
    _finalize_mpi()


def _finalize_mpi() -> None:
    """Ends MPI when DeepSpeed's discovery started it: mpirun reports a rank that exits without
    MPI_Finalize as failed, and the entry point's os._exit skips mpi4py's own atexit hook."""
    mpi_module = sys.modules.get("mpi4py.MPI")
    if mpi_module is not None and mpi_module.Is_initialized() and not mpi_module.Is_finalized():
        mpi_module.Finalize()


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def exit_process(exit_code: int) -> NoReturn:
    """Ends a training entry point once everything is written and the process group destroyed
    (`shutdown`, which also ends MPI), skipping C++ static destructors: there a still-joinable
    thread of the CPU comm stack aborted ~1 multi-rank run in 10 under load ("terminate called
    without an active exception", exit -6) although training had finished."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
