"""train.optimizer = adamw8bit: bf16 weights and torchao's 8-bit AdamW as DeepSpeed's client optimizer."""
import json
import signal
import time

import pytest
import torch

from numerics.adamw8bit import build_adamw8bit
from pretrain.ds_config import optimizer_json_problems
from tests.pretrain.training_runs import run_training, start_training, step_losses

pytest.importorskip("torchao.optim")

EIGHT_BIT = {"deepspeed.config": "ds_configs/zero0_adamw8bit.json", "train.optimizer": "adamw8bit"}


def test_the_state_dict_is_plain_tensors_and_loads_back_to_the_same_moments(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512, dtype=torch.bfloat16)
    optimizer = build_adamw8bit([{"params": list(layer.parameters()), "weight_decay": 0.1}], 1e-3, (0.9, 0.95), 1e-8, seed=0)
    for _ in range(2):
        layer(torch.randn(4, 256, dtype=torch.bfloat16)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = optimizer.state_dict()
    tensors = [v for entry in saved["state"].values() for v in entry.values()]
    plain = [t for v in tensors if isinstance(v, dict) for t in v["tensors"].values()]
    assert plain and all(type(t) is torch.Tensor for t in plain)  # nothing DeepSpeed's loader cannot unpickle
    path = tmp_path / "opt.pt"
    torch.save(saved, path)
    again = build_adamw8bit([{"params": list(layer.parameters()), "weight_decay": 0.1}], 1e-3, (0.9, 0.95), 1e-8, seed=0)
    again.load_state_dict(torch.load(path, map_location=lambda storage, loc: storage, weights_only=False))
    for p in layer.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(again.state[p][key]) is type(optimizer.state[p][key])
            assert torch.equal(again.state[p][key].dequantize(), optimizer.state[p][key].dequantize())
        assert torch.equal(again.state[p]["step"], optimizer.state[p]["step"])


@pytest.mark.parametrize("json_name, expected", [
    ("zero0_adamw8bit", None),
    ("zero0", "torch_autocast.enabled"),
    ("zero2", "zero_optimization.stage = 2"),
])
def test_the_json_must_be_zero0_without_mixed_precision(json_name, expected):
    from pretrain.config import REPO_ROOT

    config = json.loads((REPO_ROOT / f"ds_configs/{json_name}.json").read_text())
    found = optimizer_json_problems("adamw8bit", config, f"ds_configs/{json_name}.json", pipeline_stages=1)
    if expected is None:
        assert found == []
    else:
        (line,) = found
        assert line.startswith("train.optimizer = 'adamw8bit' runs at ZeRO-0") and expected in line, line
    assert optimizer_json_problems("adamw", config, "x", pipeline_stages=1) == []


@pytest.mark.slow
def test_adamw8bit_trains_and_resumes_exactly(shards, tmp_path):
    plain = run_training(tmp_path / "plain", shards, **{"train.max_steps": 12})
    whole = run_training(tmp_path / "whole", shards, **{**EIGHT_BIT, "train.max_steps": 12})
    assert len(whole) == 12 and all(loss == loss for loss in whole)
    # It learns about as fast as fp32 AdamW on fp32 weights, along nearly the same curve.
    assert whole[0] - whole[-1] > 0.5 * (plain[0] - plain[-1]) > 0, (plain, whole)
    assert whole == pytest.approx(plain, rel=0.05), (plain, whole)
    # Preempted (SIGTERM: it saves at the next step and exits 0) and rerun: the same 12 losses, so the
    # 8-bit moments, the bf16 weights and the rounding's random stream all survive the checkpoint.
    run_dir = tmp_path / "split"
    proc = start_training(run_dir, shards, 1, {"LMFORGE_FAULT_STEP_DELAY": "0.3"}, **{**EIGHT_BIT, "train.max_steps": 12})
    deadline = time.time() + 300
    while len(step_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 4:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 4"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted by SIGTERM" in out, out[-3000:]
    assert len(step_losses(run_dir)) < 12
    resumed = run_training(run_dir, shards, **{**EIGHT_BIT, "train.max_steps": 12})
    assert resumed == whole


def test_any_64_bit_seed_rounds(tmp_path):
    """torch.initial_seed() is 64-bit when nothing seeded torch: the rounding's seed still fits manual_seed."""
    layer = torch.nn.Linear(256, 256, dtype=torch.bfloat16)
    before = layer.weight.detach().clone()
    optimizer = build_adamw8bit([{"params": list(layer.parameters()), "weight_decay": 0.0}], 1e-2, (0.9, 0.95), 1e-8,
                                seed=2**64 - 1)
    layer(torch.randn(4, 256, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, before)
