"""lmforge.distributed: the line before DeepSpeed builds its CPU communication op at the process group's start."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.distributed import comm_op_to_build
from lmforge.launcher_env import RANK_VARIABLES
from tests.pretrain.training_runs import REPO, run_env

SHM_OP = "deepspeed.ops.comm.deepspeed_shm_comm_op"


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed builds the shared-memory op on a CPU only")
def test_the_shm_op_is_named_until_the_extensions_folder_holds_its_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert comm_op_to_build() == SHM_OP
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"built")
    assert comm_op_to_build() is None


@pytest.mark.parametrize("verb, said", [("train", True), (None, False)])
def test_a_verb_says_so_on_rank_zero_before_the_build(verb, said):
    probe = ("import lmforge.distributed as d\n"
             f"d.comm_op_to_build = lambda: {SHM_OP!r}\n"
             f"info = d.init_distributed({verb!r})\n"
             "print('world', info.world_size)\n")
    env = {key: value for key, value in run_env().items() if key not in RANK_VARIABLES}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("lmforge", "world"))]
    notice = (f"lmforge train: DeepSpeed builds {SHM_OP} (once per TORCH_EXTENSIONS_DIR: "
              "33 s on 2 cores)")
    assert lines == ([notice] if said else []) + ["world 1"]
