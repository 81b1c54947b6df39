"""pretrain.engine.build_model: at ZeRO-3 the model is built partitioned (deepspeed.zero.Init) with
exactly the weights of the plain build."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain.training_runs import _free_port, run_env

PROBE = Path(__file__).with_name("model_init_probe.py")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero3_build_is_partitioned_with_the_plain_builds_weights(tmp_path, arch):
    out = tmp_path / "weights.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(PROBE), str(out), arch]
    done = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out)
    assert saved["built"].keys() == saved["plain"].keys()
    for name, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["built"][name], tensor, rtol=0, atol=0, msg=name)
    assert saved["count"] == saved["plain_count"]
    assert saved["local_numel"] == 0  # nothing but partitions is held outside DeepSpeed
