"""The training loop queues every optimizer step without reading a device value on the host: on a
GPU such a read waits for the GPU and stops the CPU from running ahead (docs/performance.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain.config import REPO_ROOT
from tests.pretrain.training_runs import REPO, run_env, tiny_overrides

pytestmark = pytest.mark.slow


def host_reads(run_dir, shards, ds_json, **extra) -> dict:
    sets = tiny_overrides(run_dir, shards, **{"deepspeed.config": ds_json, "train.max_steps": 6, "run.log_interval": 3, **extra})
    result = subprocess.run([sys.executable, "-m", "tests.pretrain.host_reads_probe", *sets], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_step_reads_a_device_value_on_the_host(stage, shards, tmp_path):
    # one_rank_zero0 false: ZeRO-1/2/3's own step guard (on one rank their JSONs otherwise run as ZeRO-0, stage 0 here)
    keep = {"deepspeed.one_rank_zero0": "false"} if stage in (1, 2, 3) else {}
    found = host_reads(tmp_path / "run", shards, f"ds_configs/zero{stage}.json", **keep)
    assert found["on_device"] is True
    # ZeRO-3 records its parameters' fetch order during its first two steps (with host reads)
    first = 2 if stage == 3 else 0
    assert found["reads_per_step"][first:] == [0] * (6 - first)
    # nor waits for the device outright (DeepSpeed's throughput timer did, twice a step: pretrain.ds_config)
    assert found["device_syncs_per_step"][first:] == [0] * (6 - first)
    # each step's flags are read once: one step later inside the next step, or at a log step (3, 6)
    assert sorted(found["flags_read_steps_back"]) == [0, 0, 1, 1, 1, 1]
    assert found["loss"] > 0


def test_the_probe_sees_deepspeeds_throughput_timer_syncs(shards, tmp_path):
    """A JSON that turns DeepSpeed's throughput timer back on: its synchronize() at each forward and step is counted."""
    config = json.loads((REPO_ROOT / "ds_configs/zero0.json").read_text())
    config["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
    path = tmp_path / "timed.json"
    path.write_text(json.dumps(config))
    found = host_reads(tmp_path / "run", shards, str(path))
    # the timer starts counting at its second global step (DeepSpeed's start_step = 2)
    assert all(count >= 2 for count in found["device_syncs_per_step"][3:]) and found["reads_per_step"] == [0] * 6


def test_the_probe_sees_the_host_path_reads(shards, tmp_path):
    """fp16 autocast (a loss scaler) keeps the host-side guard: its one read per step is counted."""
    config = json.loads((REPO_ROOT / "ds_configs/zero0.json").read_text())
    config["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(config))
    found = host_reads(tmp_path / "run", shards, str(path))
    assert found["on_device"] is False
    assert all(count >= 1 for count in found["reads_per_step"]) and len(found["reads_per_step"]) == 6
