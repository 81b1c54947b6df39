"""The memory estimate's arithmetic: bytes per parameter by ZeRO stage, precision and offload, against DeepSpeed's estimators."""
from __future__ import annotations

import copy

import pytest

from launch.memory_estimate import GIB, estimate_memory, host_fraction_of_optimizer, largest_layer_params
from pretrain.config import TrainConfig
from pretrain.model import ModelConfig
from pretrain.run_checks import parameter_count

LLAMA_7B = ModelConfig(arch="llama", n_layers=32, n_heads=32, d_model=4096, d_ff=11008, max_seq_len=4096, vocab_size=32000)
LLAMA_13B = ModelConfig(arch="llama", n_layers=40, n_heads=40, d_model=5120, d_ff=13824, max_seq_len=4096, vocab_size=32000)
TRAIN = TrainConfig(micro_batch_size=1, seq_len=2048)
STATES = ("weights", "gradient", "master", "Adam")


def ds_json(stage: int, precision: str = "bf16", offload_optimizer: bool = False, offload_param: bool = False,
            ratio: float | None = None, checkpointing: bool = True) -> dict:
    zero: dict = {"stage": stage, "overlap_comm": True, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, **({"ratio": ratio} if ratio is not None else {})}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {"zero_optimization": zero, "bf16" if precision == "bf16" else "torch_autocast": {"enabled": True}}
    if checkpointing:
        config["activation_checkpointing"] = {}
    return config


def state_bytes(estimate, where: str) -> int:
    return sum(i.bytes for i in estimate.items if i.where == where and i.phase == "always" and i.name.split()[0] in
               ("bf16", "fp32", "Adam") and any(word in i.name for word in STATES))


def test_7b_zero2_bf16_on_one_gpu_holds_16_bytes_per_parameter_plus_the_step_time_fp32_gradients():
    estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(2), world=1)
    n = parameter_count(LLAMA_7B)
    assert estimate.params == n and 6.7e9 < n < 6.8e9
    assert state_bytes(estimate, "gpu") == 16 * n
    step = sum(i.bytes for i in estimate.items if i.phase == "step")
    assert step == 4 * n  # stage_1_and_2 flattens the bf16 gradient partition to fp32 in step()
    assert 20 * n < estimate.gpu_peak < 20 * n * 1.08  # + buckets, context, fragmentation
    assert estimate.gpu_peak / GIB < 140  # fits one H200


def test_zero1_under_torch_autocast_keeps_a_fp32_master_clone_and_a_bf16_cast_cache_and_overflows_one_h200():
    estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(1, precision="autocast"), world=1)
    assert state_bytes(estimate, "gpu") == 20 * estimate.params
    cache = next(i for i in estimate.items if i.name.startswith("torch.autocast's bf16 weight-cast cache"))
    assert (cache.bytes, cache.phase) == (2 * estimate.params, "backward")  # a bf16 copy of every weight until forward ends
    assert estimate.gpu_peak / GIB > 140  # so 7B at ZeRO-1 under torch_autocast does not fit one H200


def test_activation_checkpointing_keeps_only_each_blocks_input():
    with_ckpt = estimate_memory(LLAMA_7B, TRAIN, ds_json(2), world=1)
    without = estimate_memory(LLAMA_7B, TRAIN, ds_json(2, checkpointing=False), world=1)
    act = {e: next(i.bytes for i in e.items if i.name.startswith("activations")) for e in (with_ckpt, without)}
    tokens, d = 2048, 4096
    assert act[with_ckpt] == 32 * 4 * tokens * d + act[without] // 32  # fp32 block inputs + one block recomputed
    logits = next(i.bytes for i in without.items if i.name.startswith("logits"))
    assert logits == 14 * tokens * 32000


@pytest.mark.parametrize("world", [1, 8])
def test_zero3_full_offload_host_is_deepspeeds_estimate_without_its_1_5_margin(world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(3, offload_optimizer=True, offload_param=True), world=world)
    n = estimate.params
    theirs_host, theirs_gpu, _ = estimate_zero3_model_states_mem_needs(n, largest_layer_params(LLAMA_7B), world, 1, True, True, True)
    ours = state_bytes(estimate, "host")
    assert ours * 1.5 == pytest.approx(theirs_host, rel=0.01)  # 18 B/param, theirs × 1.5 margin
    assert state_bytes(estimate, "gpu") == 0  # nothing of the model states stays on the GPU


def test_zero2_gpu_model_states_match_deepspeeds_estimator_at_the_optimizer_step():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for world in (1, 8):
        estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(2), world=world)
        n = estimate.params
        _, theirs_gpu = estimate_zero2_model_states_mem_needs(n, world, 1, False)
        step = sum(i.bytes for i in estimate.items if i.phase == "step")
        ours = state_bytes(estimate, "gpu") + step
        assert ours == pytest.approx(theirs_gpu, rel=0.001)  # 2 N + 18 N / W: the same terms (buckets counted apart)


def test_offload_ratio_0_4_moves_whole_sub_groups_and_splits_13b_between_one_h200_and_120_gib_of_host():
    base = ds_json(3, precision="autocast", offload_optimizer=True)
    partition = parameter_count(LLAMA_13B)
    assert host_fraction_of_optimizer(base, partition) == 1.0
    part = copy.deepcopy(base)
    part["zero_optimization"]["offload_optimizer"]["ratio"] = 0.4
    count = -(-partition // 1_000_000_000)  # 14 sub-groups of DeepSpeed's default 1e9 elements
    assert host_fraction_of_optimizer(part, partition) == pytest.approx((count - int(0.6 * count)) * 1e9 / partition)
    full, split = (estimate_memory(LLAMA_13B, TRAIN, c, world=1) for c in (base, part))
    grads = next(i.bytes for i in split.items if i.name == "fp32 gradient partition (host buffer)")
    assert grads == 4 * partition  # stage3.py's host gradient buffer holds the whole partition, whatever the ratio
    assert full.host_peak / GIB > 120 > split.host_peak / GIB
    assert split.gpu_peak / GIB < 140 < estimate_memory(LLAMA_13B, TRAIN, ds_json(3, "autocast"), world=1).gpu_peak / GIB


def test_without_zero_init_every_rank_on_a_host_first_builds_the_whole_fp32_model():
    estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(2), world=8)
    built = next(i.bytes for i in estimate.items if i.name.startswith("full fp32 model"))
    assert built == 8 * 4 * estimate.params
    # pretrain.engine.build_model uses zero.Init at ZeRO-3 with an offload only
    assert not any(i.name.startswith("full fp32 model")
                   for i in estimate_memory(LLAMA_7B, TRAIN, ds_json(3, offload_optimizer=True), world=8).items)
    assert any(i.name.startswith("full fp32 model") for i in estimate_memory(LLAMA_7B, TRAIN, ds_json(3), world=8).items)


def test_on_the_cpu_accelerator_everything_is_host_memory_and_there_is_no_gpu_peak():
    estimate = estimate_memory(LLAMA_7B, TRAIN, ds_json(2), world=1, device="cpu")
    assert estimate.gpu_peak == 0
    assert estimate.host_peak > 20 * estimate.params


def test_host_estimate_is_within_15_percent_of_the_measured_rss_increase_of_a_zero3_offload_run_on_2_cpu_ranks(tmp_path):
    """Real DeepSpeed ZeRO-3 (zero.Init, optimizer and parameters offloaded) on 2 torchrun CPU ranks, 5.7M params.
    Larger sizes (21M, 69M) measured 16% and 20% above the estimate: docs/performance.md "## Memory estimate"."""
    from launch.memory_estimate import HOST_BASELINE_BYTES
    from pretrain.ds_config import build_deepspeed_config
    from tests.launch.memory_calibration import calibration_configs, measure

    model, train, json_path = calibration_configs(2, 256)
    estimate = estimate_memory(model, train, build_deepspeed_config(json_path, train, 2, False), world=2, device="cpu",
                               ranks_per_host=1)
    records = measure(2, 256, tmp_path)
    assert [r["params"] for r in records] == [estimate.params] * 2  # zero.Init's ds_numel: the whole model on each rank
    for record in records:
        measured = record["peak"] - record["baseline"]
        assert abs((estimate.host_peak - HOST_BASELINE_BYTES) / measured - 1) < 0.15, (estimate.host_peak, record)


def test_zero0_under_torch_autocast_steps_the_fp32_weights_themselves_and_matches_the_h200_measurement():
    # ZeRO-0 hands torch's fused AdamW the fp32 weights: no master copy (16 B/param of model states).
    train = TrainConfig(micro_batch_size=1, grad_accum_steps=16, seq_len=2048)
    estimate = estimate_memory(LLAMA_7B, train, ds_json(0, precision="autocast", checkpointing=False), world=1)
    n = parameter_count(LLAMA_7B)
    assert state_bytes(estimate, "gpu") == 16 * n
    assert not any("master" in i.name for i in estimate.items)
    # measured on one H200 (docs/performance.md, llama-7b, ds_configs/zero0.json, 1 x 2048, no checkpointing):
    # GPU peak 122.1 GiB allocated, host peak 25.9 GiB
    assert abs(estimate.gpu_peak / GIB - 122.1) / 122.1 < 0.15
    assert abs(estimate.host_peak / GIB - 25.9) / 25.9 < 0.15


def test_adamw8bit_holds_13b_on_one_h200_in_6_bytes_per_parameter_with_no_master():
    # train.optimizer = adamw8bit (numerics/adamw8bit.py): bf16 weights 2 + bf16 gradients 2 + 8-bit m, v 2 bytes,
    # plus one fp32 scale per 256 moment values; nothing offloaded, no fp32 copy on the device.
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=16, seq_len=2048, optimizer="adamw8bit")
    estimate = estimate_memory(LLAMA_13B, train, {"zero_optimization": {"stage": 0}}, world=1)
    n = parameter_count(LLAMA_13B)
    states = sum(i.bytes for i in estimate.items if i.name in ("bf16 weights", "bf16 gradients") or "8-bit" in i.name)
    assert states == 6 * n + 8 * -(-n // 256)
    assert not any("master" in i.name or i.where == "host" and "moments" in i.name for i in estimate.items)
    assert estimate.gpu_peak < 135 * GIB  # one H200 (139.8 GiB) with room left; the fp32 states would need 16 n
    assert estimate.host_peak < 120 * GIB  # the fp32 model built once on the host, then cast
