"""ZeRO-1/2 on one data-parallel rank: overlap and contiguous buckets off (pretrain.ds_config.for_one_zero_rank),
announced at launch, with ZeRO-0's losses; multi-rank runs keep the JSON's settings."""
import json
import subprocess

import pytest

from pretrain import checkpoint
from pretrain.config import REPO_ROOT
from pretrain.ds_config import ONE_RANK_ZERO_SETTINGS, for_one_zero_rank
from tests.pretrain.training_runs import REPO, run_env, step_losses, tiny_overrides, training_command


def shipped(name: str) -> dict:
    return json.loads((REPO_ROOT / "ds_configs" / name).read_text())


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero1_actckpt.json", "zero2_bf16.json"])
def test_one_rank_zero_1_2_turn_overlap_and_contiguous_buckets_off_with_a_note(name):
    config, note = for_one_zero_rank(shipped(name), 1)
    zero = config["zero_optimization"]
    assert (zero["overlap_comm"], zero["contiguous_gradients"]) == (False, False)
    assert zero["stage"] == shipped(name)["zero_optimization"]["stage"]  # the stage (and checkpoint format) stays
    assert note.startswith(f"ZeRO-{zero['stage']} on one data-parallel rank: zero_optimization overlap_comm false, contiguous_gradients false")
    assert shipped(name)["zero_optimization"]["overlap_comm"] is True  # a copy: the JSON read is unchanged


@pytest.mark.parametrize("name,ranks", [("zero1.json", 2), ("zero2.json", 4), ("zero0.json", 1), ("zero3.json", 1),
                                        ("zero3_offload.json", 1)])
def test_other_layouts_keep_the_json_as_it_is(name, ranks):
    config, note = for_one_zero_rank(shipped(name), ranks)
    assert config == shipped(name) and note is None


def test_a_json_already_without_overlap_and_buckets_needs_no_note():
    config = {"zero_optimization": {"stage": 2, **ONE_RANK_ZERO_SETTINGS}}
    assert for_one_zero_rank(config, 1) == (config, None)


def train_one_rank(run_dir, shards, stage: int) -> tuple[list[dict], str]:
    sets = tiny_overrides(run_dir, shards, **{"deepspeed.config": f"ds_configs/zero{stage}.json", "model.arch": "gpt2",
                                              "model.n_kv_heads": "null", "train.max_steps": 10})
    result = subprocess.run(training_command(1) + ["--config", "tiny", *sets], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "loss" in line], result.stdout


@pytest.mark.slow
def test_one_rank_zero_1_and_2_train_with_zero_0s_losses_and_say_so(shards, tmp_path):
    reference, _ = train_one_rank(tmp_path / "zero0", shards, 0)
    assert len(reference) == 10 and reference[-1]["loss"] < reference[0]["loss"]
    for stage in (1, 2):
        steps, stdout = train_one_rank(tmp_path / f"zero{stage}", shards, stage)
        assert f"note: ZeRO-{stage} on one data-parallel rank: zero_optimization overlap_comm false" in stdout
        for ours, theirs in zip(steps, reference, strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=0), f"ZeRO-{stage} step {ours['step']}"
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6, abs=0), f"ZeRO-{stage} step {ours['step']}"


@pytest.mark.slow
def test_a_one_rank_zero1_checkpoint_resumes_on_2_ranks_through_the_universal_checkpoint(shards, tmp_path):
    """The one-rank settings leave the checkpoint as ZeRO-1 writes it: 1 → 2 ranks continues the curve."""
    from tests.pretrain.test_resume_elastic import TOLERANCE, rewind_to, train

    one = tmp_path / "one"
    assert "note: ZeRO-1 on one data-parallel rank" in train(one, shards, 1)
    reference = step_losses(one)
    run = rewind_to(one, tmp_path / "on2", 4)
    out = train(run, shards, 2)
    assert "note: ZeRO-1 on one data-parallel rank" not in out  # two ranks keep the JSON's settings
    assert (f"(saved on 1 data-parallel ranks, loaded through {run / 'checkpoints' / 'step_00000004' / 'universal'})") in out
    losses = step_losses(run)
    assert losses[:4] == reference[:4]
    assert losses[4:] == pytest.approx(reference[4:], rel=TOLERANCE)
    assert checkpoint.read_record(run / "checkpoints" / "step_00000008")["zero_stage"] == 1
