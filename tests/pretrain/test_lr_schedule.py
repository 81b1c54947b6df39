"""lmforge's learning-rate schedule (docs/parity.md) is what DeepSpeed's WarmupCosineLR runs with our values."""
from dataclasses import replace

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from bench.reference_loop import learning_rate
from pretrain.config import REPO_ROOT, TrainConfig
from pretrain.ds_config import build_deepspeed_config


def deepspeed_lrs(train: TrainConfig) -> list[float]:
    """The lr each optimizer step updates with, driving the scheduler as DeepSpeed's engine does."""
    params = build_deepspeed_config(REPO_ROOT / "ds_configs/zero1.json", train, 1, bf16_supported=False)["scheduler"]["params"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = WarmupCosineLR(optimizer, **params)
    lrs = []
    for _ in range(train.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # the engine steps it after each applied optimizer step
    return lrs


@pytest.mark.parametrize("warmup, total", [(0, 12), (1, 12), (2, 12), (3, 12), (5, 50), (20, 50), (20, 200), (12, 12)])
def test_deepspeed_runs_the_documented_schedule(warmup, total):
    train = replace(TrainConfig(), lr=3e-3, min_lr=3e-4, warmup_steps=warmup, max_steps=total)
    expected = [learning_rate(step, train) for step in range(1, total + 1)]
    assert deepspeed_lrs(train) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_first_step_at_zero_then_linear_warmup_then_cosine_to_min_lr_at_the_last_step():
    train = replace(TrainConfig(), lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=10)
    lrs = deepspeed_lrs(train)
    assert lrs[:4] == pytest.approx([0.0, 0.25e-3, 0.5e-3, 0.75e-3])  # step k <= 4: lr (k - 1) / 4
    # steps 5..10 on the cosine at progress (k - 4) / 6: step 7 halfway, step 10 at min_lr
    assert lrs[6] == pytest.approx(0.55e-3) and lrs[9] == pytest.approx(1e-4)
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
