"""On a world of one rank ZeRO-1/2/3 JSONs run as ZeRO-0 (pretrain.ds_config.as_zero0_on_one_rank), or with
deepspeed.one_rank_zero0 false ZeRO-1/2 as ZeRO-1 with overlap and contiguous buckets off (for_one_zero_rank),
announced at launch, with ZeRO-0's losses; their checkpoints resume on more ranks; multi-rank runs keep the JSON's settings."""
import json
import subprocess

import pytest

from lmforge.errors import LmforgeError
from pretrain import checkpoint
from pretrain.config import REPO_ROOT
from pretrain.ds_config import ONE_RANK_ZERO_SETTINGS, as_zero0_on_one_rank, for_one_zero_rank
from pretrain.universal_checkpoint import needs_universal
from tests.pretrain.training_runs import REPO, run_env, step_losses, tiny_overrides, training_command


def shipped(name: str) -> dict:
    return json.loads((REPO_ROOT / "ds_configs" / name).read_text())


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero1_actckpt.json", "zero2_bf16.json"])
def test_one_rank_zero_1_2_run_as_zero1_without_overlap_and_contiguous_buckets_with_a_note(name):
    stage = shipped(name)["zero_optimization"]["stage"]
    config, note = for_one_zero_rank(shipped(name), 1)
    zero = config["zero_optimization"]
    assert (zero["stage"], zero["overlap_comm"], zero["contiguous_gradients"]) == (1, False, False)
    assert {k: v for k, v in config.items() if k != "zero_optimization"} == {k: v for k, v in shipped(name).items() if k != "zero_optimization"}
    built_as = "built as ZeRO-1 (no gradients to partition at one rank), " if stage == 2 else ""
    assert note.startswith(f"ZeRO-{stage} on one data-parallel rank: {built_as}zero_optimization.overlap_comm false, "
                           "zero_optimization.contiguous_gradients false: less host time per step")
    assert shipped(name)["zero_optimization"]["overlap_comm"] is True  # a copy: the JSON read is unchanged


@pytest.mark.parametrize("name,ranks", [("zero1.json", 2), ("zero2.json", 4), ("zero0.json", 1), ("zero3.json", 1),
                                        ("zero3_offload.json", 1)])
def test_other_layouts_keep_the_json_as_it_is(name, ranks):
    config, note = for_one_zero_rank(shipped(name), ranks)
    assert config == shipped(name) and note is None


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero1_actckpt.json"])
def test_a_one_rank_world_builds_zero_1_2_as_zero0_with_a_note(name):
    config, note = as_zero0_on_one_rank(shipped(name), 1, None)
    stage = shipped(name)["zero_optimization"]["stage"]
    assert config["zero_optimization"] == {"stage": 0}
    assert {k: v for k, v in config.items() if k != "zero_optimization"} == {k: v for k, v in shipped(name).items() if k != "zero_optimization"}
    assert note.startswith(f"ZeRO-{stage} on one rank: built as ZeRO-0")
    assert as_zero0_on_one_rank(shipped(name), 1, 0) == (config, note)  # resuming its own ZeRO-0 checkpoint


def test_a_one_rank_world_builds_zero3_as_zero0_without_deepcompile():
    """DeepCompile's passes are ZeRO-3's: the JSON's `compile` section goes with the stage (train.compile stays)."""
    assert shipped("zero3.json")["compile"] == {"deepcompile": True}
    config, note = as_zero0_on_one_rank(shipped("zero3.json"), 1, None)
    assert config["zero_optimization"] == {"stage": 0} and "compile" not in config
    assert {k: v for k, v in config.items() if k != "zero_optimization"} == {
        k: v for k, v in shipped("zero3.json").items() if k not in ("zero_optimization", "compile")}
    assert note.startswith("ZeRO-3 on one rank: built as ZeRO-0") and "ZeRO-1/2/3 on more ranks resume" in note
    assert as_zero0_on_one_rank(shipped("zero3.json"), 1, 3) == (shipped("zero3.json"), None)  # its own ZeRO-3 checkpoint


@pytest.mark.parametrize("name,world,saved", [("zero1.json", 2, None), ("zero2.json", 1, 1), ("zero1.json", 1, 2),
                                              ("zero2_bf16.json", 1, None), ("zero3.json", 2, None),
                                              ("zero3_offload.json", 1, None), ("zero0.json", 1, None)])
def test_zero0_is_not_built_for_more_ranks_a_zero_checkpoint_bf16_mode_or_offload(name, world, saved):
    assert as_zero0_on_one_rank(shipped(name), world, saved) == (shipped(name), None)


def test_a_json_already_without_overlap_and_buckets_changes_only_a_zero2_stage():
    config = {"zero_optimization": {"stage": 1, **ONE_RANK_ZERO_SETTINGS}}
    assert for_one_zero_rank(config, 1) == (config, None)
    built, note = for_one_zero_rank({"zero_optimization": {"stage": 2, **ONE_RANK_ZERO_SETTINGS}}, 1)
    assert built["zero_optimization"]["stage"] == 1 and note.endswith("(docs/performance.md)")


def test_zero1_and_zero2_checkpoints_load_each_other_only_on_another_number_of_ranks(tmp_path):
    """A ZeRO-2 JSON runs as ZeRO-1 on one rank: its checkpoint and a ZeRO-2 one cross through the universal form."""
    assert needs_universal({"data_parallel_size": 2, "zero_stage": 2}, 1, 1, tmp_path) is True
    assert needs_universal({"data_parallel_size": 1, "zero_stage": 1}, 4, 2, tmp_path) is True
    for record, ranks, stage in (({"data_parallel_size": 2, "zero_stage": 1}, 2, 2), ({"data_parallel_size": 1, "zero_stage": 0}, 2, 1)):
        with pytest.raises(LmforgeError, match=f"written with ZeRO-{record['zero_stage']} but deepspeed.config is ZeRO-{stage}"):
            needs_universal(record, ranks, stage, tmp_path)


def train_one_rank(run_dir, shards, stage: int, **extra) -> tuple[list[dict], str]:
    sets = tiny_overrides(run_dir, shards, **{"deepspeed.config": f"ds_configs/zero{stage}.json", "model.arch": "gpt2",
                                              "model.n_kv_heads": "null", "train.max_steps": 10, **extra})
    result = subprocess.run(training_command(1) + ["--config", "tiny", *sets], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "loss" in line], result.stdout


KEEP_STAGE = {"deepspeed.one_rank_zero0": "false"}


@pytest.mark.slow
def test_one_rank_zero_1_and_2_train_with_zero_0s_losses_and_say_so(shards, tmp_path):
    """Built as ZeRO-0 by default (ZeRO-3 too); with deepspeed.one_rank_zero0 false, ZeRO-1/2 as ZeRO-1 without
    overlap and buckets."""
    reference, _ = train_one_rank(tmp_path / "zero0", shards, 0)
    assert len(reference) == 10 and reference[-1]["loss"] < reference[0]["loss"]
    for stage in (1, 2, 3):
        steps, stdout = train_one_rank(tmp_path / f"zero{stage}", shards, stage)
        assert f"note: ZeRO-{stage} on one rank: built as ZeRO-0" in stdout and ", ZeRO-0, " in stdout
        assert checkpoint.read_record(tmp_path / f"zero{stage}" / "checkpoints" / "step_00000010")["zero_stage"] == 0
        assert [(s["loss"], s["grad_norm"]) for s in steps] == [(s["loss"], s["grad_norm"]) for s in reference]
        if stage == 3:
            continue
        steps, stdout = train_one_rank(tmp_path / f"zero{stage}_kept", shards, stage, **KEEP_STAGE)
        assert f"note: ZeRO-{stage} on one data-parallel rank: " in stdout and "overlap_comm false" in stdout
        for ours, theirs in zip(steps, reference, strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=0), f"ZeRO-{stage} step {ours['step']}"
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6, abs=0), f"ZeRO-{stage} step {ours['step']}"


@pytest.mark.slow
@pytest.mark.parametrize("stage,keep", [(1, False), (2, False), (3, False), (1, True)])
def test_a_one_rank_checkpoint_resumes_on_2_ranks_at_the_jsons_stage(stage, keep, shards, tmp_path):
    """One rank writes ZeRO-0's checkpoint (ZeRO-1's with one_rank_zero0 false): on 2 ranks at the JSON's
    stage it continues the curve, each rank taking its slice of the optimizer state (through the universal
    checkpoint for ZeRO-1's, and for ZeRO-3 from ZeRO-0's: pretrain.universal_checkpoint.zero0_universal_copy)."""
    from tests.pretrain.test_resume_elastic import TOLERANCE, rewind_to, train

    one = tmp_path / "one"
    json_set = {"deepspeed.config": f"ds_configs/zero{stage}.json"}
    out = train(one, shards, 1, **json_set, **(KEEP_STAGE if keep else {}))
    assert (f"note: ZeRO-{stage} on one data-parallel rank" if keep else f"note: ZeRO-{stage} on one rank: built as ZeRO-0") in out
    assert checkpoint.read_record(one / "checkpoints" / "step_00000004")["zero_stage"] == (1 if keep else 0)
    reference = step_losses(one)
    run = rewind_to(one, tmp_path / "on2", 4)
    out = train(run, shards, 2, **json_set)
    assert "on one data-parallel rank" not in out and "on one rank" not in out  # two ranks keep the JSON's settings
    if keep or stage == 3:
        assert f"(saved on 1 data-parallel ranks, loaded through {run / 'checkpoints' / 'step_00000004' / 'universal'})" in out
    else:
        assert f"(ZeRO-0's checkpoint, loaded into ZeRO-{stage})" in out
    losses = step_losses(run)
    assert losses[:4] == reference[:4]
    assert losses[4:] == pytest.approx(reference[4:], rel=TOLERANCE)
    assert checkpoint.read_record(run / "checkpoints" / "step_00000008")["zero_stage"] == stage


FOREACH_NORM_PROBE = """
import json, torch
from dataclasses import replace
from bench.host_overhead import build_stepper
from lmforge.distributed import init_distributed, shutdown
from pretrain.config import TrainConfig
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
init_distributed()
_, engine = build_stepper(2, replace(TrainConfig(), micro_batch_size=1, seq_len=32, max_steps=100, warmup_steps=10))
zero, found = engine.optimizer, {}
found["installed"] = "get_grad_norm_direct" in vars(zero)
grads = [torch.randn(100, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(196)]
params = [torch.nn.Parameter(torch.zeros(1)) for _ in grads]
found["ours"], found["deepspeeds"] = float(zero.get_grad_norm_direct(grads, params)), float(DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, grads, params))
grads[3][0] = float("inf")
found["inf"] = [float(zero.get_grad_norm_direct(grads, params)), float(DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, grads, params))]
print(json.dumps(found), flush=True)
shutdown()  # without it gloo's threads can abort the process at exit (CI saw "terminate called")
"""


@pytest.mark.slow
def test_the_one_rank_foreach_norm_equals_deepspeeds_per_tensor_norm():
    """pretrain.guarded_step swaps DeepSpeed's per-tensor norm loop for one foreach call at one ZeRO rank."""
    import sys

    result = subprocess.run([sys.executable, "-c", FOREACH_NORM_PROBE], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["installed"] is True
    assert found["ours"] == found["deepspeeds"] > 0
    assert found["inf"] == [-1.0, -1.0]  # DeepSpeed's mark of a non-finite norm, which the guard reads


@pytest.mark.slow
def test_a_two_rank_zero2_checkpoint_resumes_on_one_rank_as_zero1(shards, tmp_path):
    """The other way: ZeRO-2's checkpoint of 2 ranks continues on one rank, where the JSON runs as ZeRO-1."""
    from tests.pretrain.test_resume_elastic import TOLERANCE, rewind_to, train

    two = tmp_path / "two"
    train(two, shards, 2, **{"deepspeed.config": "ds_configs/zero2.json"})
    reference = step_losses(two)
    run = rewind_to(two, tmp_path / "on1", 4)
    out = train(run, shards, 1, **{"deepspeed.config": "ds_configs/zero2.json"})
    assert "note: ZeRO-2 on one data-parallel rank: built as ZeRO-1" in out
    assert f"(saved on 2 data-parallel ranks, loaded through {run / 'checkpoints' / 'step_00000004' / 'universal'})" in out
    losses = step_losses(run)
    assert losses[:4] == reference[:4]
    assert losses[4:] == pytest.approx(reference[4:], rel=TOLERANCE)
    assert checkpoint.read_record(run / "checkpoints" / "step_00000008")["zero_stage"] == 1


def allreduce_probe(run_dir, shards, nproc: int, **extra) -> dict:
    sets = tiny_overrides(run_dir, shards, **{"deepspeed.config": "ds_configs/zero0.json", "train.max_steps": 3, **extra})
    command = training_command(nproc)
    command[command.index("pretrain.train")] = "tests.pretrain.allreduce_probe"
    result = subprocess.run(command + sets, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_zero0_on_one_rank_skips_deepspeeds_gradient_allreduce_and_two_ranks_keep_it(shards, tmp_path):
    one = allreduce_probe(tmp_path / "one", shards, 1)
    assert (one["world"], one["enable_backward_allreduce"], one["allreduces"]) == (1, False, 0)
    # ZeRO-0's zero_grad clears the gradients from a list made once (pretrain.engine._zero_grad_from_a_list)
    assert (one["module_walks"], one["grads_cleared"]) == (0, True)
    # two ranks, each half of the global batch: DeepSpeed's all-reduce averages them, and the step's gradient
    # norm is the one-rank run's over the same global batch (one rank takes it as 2 accumulated micro-batches)
    two = allreduce_probe(tmp_path / "two", shards, 2, **{"train.micro_batch_size": 4})
    assert (two["world"], two["enable_backward_allreduce"], two["allreduces"]) == (2, True, 3)
    accumulated = allreduce_probe(tmp_path / "acc", shards, 1, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 2})
    assert accumulated["allreduces"] == 0
    assert abs(two["grad_norm"] - accumulated["grad_norm"]) <= 1e-5 * accumulated["grad_norm"]


def autocast_json(tmp_path, stage: int, **autocast) -> str:
    """A ZeRO-`stage` JSON with bf16 autocast on (true, not "auto": this CPU runs it too)."""
    config = {**shipped(f"zero{stage}.json"), "torch_autocast": {"enabled": True, "dtype": "bfloat16", **autocast}}
    path = tmp_path / f"zero{stage}_autocast_{len(autocast)}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
def test_under_bf16_autocast_zero1_steps_on_the_fp32_gradients_unless_the_json_asks_for_bf16_reduction(shards, tmp_path):
    """DeepSpeed marks nn.Linear weights (gpt2's head, tied to the embedding) for reduction in bf16; lmforge's empty
    lower_precision_safe_modules keeps every gradient fp32, so ZeRO-1's gradient norm is ZeRO-0's (which one rank
    never reduces); the JSON's own list brings the rounding back, and the probe sees it.

    Clipping is off: ZeRO-0 and ZeRO-1 sum the clipping norm in different orders (1e-7 apart), and by the third step
    bf16 autocast can round a weight that moved by one fp32 ulp to a different bf16 value, which put the norms
    3.5e-5 apart on one CPU with clipping on (and 0 apart with it off) without any gradient reduced in bf16. The
    bf16 reduction's own effect on the norm is smaller (5.8e-6 at the third step)."""
    gpt2 = {"model.arch": "gpt2", "model.n_kv_heads": "null", "train.grad_clip": 0}
    zero0 = allreduce_probe(tmp_path / "z0", shards, 1, **gpt2, **{"deepspeed.config": autocast_json(tmp_path, 0)})
    zero1 = allreduce_probe(tmp_path / "z1", shards, 1, **gpt2, **KEEP_STAGE, **{"deepspeed.config": autocast_json(tmp_path, 1)})
    rounded = allreduce_probe(tmp_path / "bf16", shards, 1, **gpt2, **KEEP_STAGE, **{
        "deepspeed.config": autocast_json(tmp_path, 1, lower_precision_safe_modules=["torch.nn.Linear"])})
    assert abs(zero1["grad_norm"] - zero0["grad_norm"]) <= 1e-7 * zero0["grad_norm"]  # equal here
    assert abs(rounded["grad_norm"] - zero0["grad_norm"]) > 1e-6 * zero0["grad_norm"]  # 5.8e-6 apart here
