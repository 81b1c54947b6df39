"""pretrain.model_init.build_model: a ZeRO-3 model built under deepspeed.zero.Init gets the plain model's init."""
import json
import subprocess
import sys

from tests.launch.launch_runs import REPO, free_port, launch_env

SCRIPT = """
import json, os, torch, deepspeed
from lmforge.distributed import init_distributed
init_distributed()
from pretrain.model import ModelConfig
from pretrain.model_init import build_model
cfg = ModelConfig(arch="llama", vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64)
model = build_model(cfg, {"zero_optimization": {"stage": 3}, "train_batch_size": 1})
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    print(json.dumps({n: [p.numel(), p.ds_numel, float(p.std()), float(p.mean())] for n, p in model.named_parameters()}))
"""


def test_zero3_model_under_zero_init_is_partitioned_and_initialised_like_the_plain_model():
    env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["embed.weight"][1] == 512 * 64
    for name, (_, _, std, mean) in stats.items():
        if name.endswith("norm.weight"):
            assert (std, mean) == (0.0, 1.0), name  # RMSNorm ones, untouched
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(std - 0.02 / 2) < 0.001, (name, std)  # residual projections: init_std / sqrt(2 * n_layers)
        else:
            assert abs(std - 0.02) < 0.002, (name, std)  # not nn.Linear's default kaiming init (std ~ 1/sqrt(3 * 64))
