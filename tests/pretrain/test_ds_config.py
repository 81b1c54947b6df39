"""The one merge point of our YAML into DeepSpeed's JSON: filled values, contradictions, precision."""
import json
from dataclasses import replace

import pytest

from lmforge.errors import LmforgeError
from pretrain.config import REPO_ROOT, TrainConfig
from pretrain.ds_config import activation_checkpoint_every, build_deepspeed_config, precision_of, zero_stage_of


def write(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


def test_yaml_values_fill_the_deepspeed_json():
    train = replace(TrainConfig(), micro_batch_size=4, grad_accum_steps=3, lr=1e-3, min_lr=1e-4, grad_clip=0.5,
                    max_steps=50, warmup_steps=5)
    config = build_deepspeed_config(REPO_ROOT / "ds_configs/zero2.json", train, 2, bf16_supported=False)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "fused": True, "lr": 1e-3, "betas": [0.9, 0.95],
                                                               "eps": 1e-8, "weight_decay": 0.1}}
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    # shifted by one: DeepSpeed's first step runs at lr 0 (pretrain.ds_config.warmup_cosine_params)
    assert config["scheduler"]["params"]["total_num_steps"] == 49
    assert config["scheduler"]["params"]["warmup_num_steps"] == 4
    assert config["scheduler"]["params"]["warmup_min_ratio"] == pytest.approx(0.2)
    assert config["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(0.1)
    assert zero_stage_of(config) == 2


def test_deepspeeds_throughput_timer_is_off_unless_the_json_sets_timers(tmp_path):
    """Its synchronize() at every forward and step would make the host wait for the GPU twice a step."""
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        config = build_deepspeed_config(REPO_ROOT / f"ds_configs/{name}.json", TrainConfig(), 1, bf16_supported=True)
        assert config["timers"] == {"throughput": {"enabled": False}}, name
    own = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    config = build_deepspeed_config(write(tmp_path, own), TrainConfig(), 1, bf16_supported=False)
    assert config["timers"] == own["timers"]


def test_under_autocast_zero_0_to_2_reduce_gradients_in_fp32_unless_the_json_lists_modules(tmp_path):
    """DeepSpeed would mark every nn.Linear weight for bf16 reduction (tests/pretrain/test_one_rank_zero.py sees it)."""
    for name in ("zero0", "zero1", "zero2"):
        config = build_deepspeed_config(REPO_ROOT / f"ds_configs/{name}.json", TrainConfig(), 1, bf16_supported=True)
        assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}, name
    zero3 = build_deepspeed_config(REPO_ROOT / "ds_configs/zero3.json", TrainConfig(), 1, bf16_supported=True)
    assert "lower_precision_safe_modules" not in zero3["torch_autocast"]  # DeepSpeed's default kept at ZeRO-3
    on_cpu = build_deepspeed_config(REPO_ROOT / "ds_configs/zero1.json", TrainConfig(), 1, bf16_supported=False)
    assert on_cpu["torch_autocast"] == {"enabled": False, "dtype": "bfloat16"}
    own = {"torch_autocast": {"enabled": True, "lower_precision_safe_modules": ["torch.nn.Linear"]}}
    config = build_deepspeed_config(write(tmp_path, own), TrainConfig(), 1, bf16_supported=True)
    assert config["torch_autocast"]["lower_precision_safe_modules"] == ["torch.nn.Linear"]


def test_a_contradiction_between_json_and_yaml_is_an_error_naming_both(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})
    with pytest.raises(LmforgeError) as err:
        build_deepspeed_config(path, TrainConfig(micro_batch_size=8), 1, bf16_supported=False)
    message = str(err.value)
    assert "train_micro_batch_size_per_gpu = 16 contradicts train.micro_batch_size = 8" in message
    assert "optimizer.params.lr = 0.1 contradicts train.lr = 0.0003" in message
    assert len(message.splitlines()) == 2  # one line each


def test_global_batch_arithmetic_is_checked(tmp_path):
    path = write(tmp_path, {"train_batch_size": 32})
    build_deepspeed_config(path, TrainConfig(micro_batch_size=8, grad_accum_steps=2), 2, bf16_supported=False)
    with pytest.raises(LmforgeError, match="train_batch_size = 32 contradicts"):
        build_deepspeed_config(path, TrainConfig(micro_batch_size=8, grad_accum_steps=2), 4, bf16_supported=False)


def test_auto_precision_is_bf16_autocast_on_gpu_and_fp32_on_cpu():
    path = REPO_ROOT / "ds_configs/zero1.json"
    assert precision_of(build_deepspeed_config(path, TrainConfig(), 1, bf16_supported=True)) == "autocast-bf16"
    assert precision_of(build_deepspeed_config(path, TrainConfig(), 1, bf16_supported=False)) == "fp32"
    bf16 = REPO_ROOT / "ds_configs/zero2_bf16.json"
    assert precision_of(build_deepspeed_config(bf16, TrainConfig(), 1, bf16_supported=True)) == "bf16"


def test_fp16_without_a_gpu_is_refused_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine trains fp16")
    with pytest.raises(LmforgeError, match="fp16 only on GPUs"):
        build_deepspeed_config(REPO_ROOT / "ds_configs/zero2_fp16.json", TrainConfig(), 1, bf16_supported=False)


def test_missing_or_malformed_json_is_a_one_line_error(tmp_path):
    with pytest.raises(LmforgeError, match="file not found"):
        build_deepspeed_config(tmp_path / "nope.json", TrainConfig(), 1, bf16_supported=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 1,}}')
    with pytest.raises(LmforgeError, match=r"bad.json: not valid JSON \(line 1"):
        build_deepspeed_config(bad, TrainConfig(), 1, bf16_supported=False)


def test_activation_checkpointing_every_kth_block_follows_number_checkpoints():
    assert activation_checkpoint_every({}, 12) is None
    assert activation_checkpoint_every({"activation_checkpointing": {}}, 12) == 1
    assert activation_checkpoint_every({"activation_checkpointing": {"number_checkpoints": 4}}, 12) == 3


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")))
def test_every_shipped_json_merges_with_the_default_config(name):
    import torch

    if "fp16" in name and not torch.cuda.is_available():
        pytest.skip("fp16 needs a GPU")
    config = build_deepspeed_config(REPO_ROOT / "ds_configs" / name, TrainConfig(), 2, bf16_supported=True)
    assert config["train_batch_size"] == TrainConfig().micro_batch_size * 2


def test_zero_warmup_steps_start_at_the_full_lr_in_deepspeeds_scheduler():
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    train = replace(TrainConfig(), lr=1e-3, min_lr=1e-4, max_steps=10, warmup_steps=0)
    params = build_deepspeed_config(REPO_ROOT / "ds_configs/zero1.json", train, 1, bf16_supported=False)["scheduler"]["params"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = WarmupCosineLR(optimizer, **params)  # DeepSpeed raises on warmup_num_steps = 0
    lrs = []
    for _ in range(train.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step updates with
        optimizer.step()
        scheduler.step()
    # DeepSpeed's WarmupCosineLR gives lr 0 before its first step() (for any warmup), then here
    # the full lr at once, decaying by cosine
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
    assert lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < 1e-3
