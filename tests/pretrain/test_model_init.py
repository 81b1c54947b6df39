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


def test_plain_builds_draw_on_the_gpu_below_zero3_and_on_the_host_otherwise():
    from pretrain.engine import plain_build_device

    gpu = torch.device("cuda", 1)
    for stage in (0, 1, 2):
        assert plain_build_device(gpu, {"zero_optimization": {"stage": stage}}) == gpu
    assert plain_build_device(gpu, {}) == gpu  # no zero_optimization section: ZeRO-0
    assert plain_build_device(gpu, {"zero_optimization": {"stage": 3}}) is None  # the host holds the whole model
    assert plain_build_device(gpu, {"zero_optimization": {"stage": 1}, "pipeline": {"stages": 2}}) is None
    assert plain_build_device(torch.device("cpu"), {"zero_optimization": {"stage": 0}}) is None
    assert plain_build_device(None, {"zero_optimization": {"stage": 0}}) is None


def test_a_host_build_for_a_cpu_run_is_the_plain_build():
    from pretrain.engine import build_model
    from pretrain.model import ModelConfig, Transformer

    config = ModelConfig(arch="gpt2", vocab_size=100, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)
    torch.manual_seed(3)
    built = build_model(config, {"zero_optimization": {"stage": 1}}, torch.device("cpu"))
    torch.manual_seed(3)
    plain = Transformer(config)
    for (name, a), (_, b) in zip(built.state_dict().items(), plain.state_dict().items()):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
