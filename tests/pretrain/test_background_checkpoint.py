"""train.checkpoint_writer=background (pretrain/background_checkpoint.py): training goes on while a
checkpoint is written, the checkpoint is the blocking writer's (same files, same weights through
zero_to_fp32), a run killed while one is written resumes from the previous one, and resuming stays
bit-exact; ZeRO-1 on 1 rank and ZeRO-2 on 2 ranks (torchrun)."""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.background_checkpoint import WRITTEN_RECORD, BackgroundCheckpointEngine, write_hashed
from pretrain.ds_config import checkpoint_writer_of, checkpoint_writer_problems
from tests.pretrain.test_resume_interrupted import (assert_latest_is_complete_and_intact, crash, deterministic_metrics,
                                                    logged_steps, wait_for)
from tests.pretrain.training_runs import run_training, start_training

SETUPS = {"zero1-1rank": (1, "ds_configs/zero1.json"), "zero2-2ranks": (2, "ds_configs/zero2.json")}
MAX_STEPS, SAVE_INTERVAL = 8, 3


def settings(setup: str, writer: str, **more) -> dict:
    return {"deepspeed.config": SETUPS[setup][1], "train.max_steps": MAX_STEPS, "train.save_interval": SAVE_INTERVAL,
            "train.keep_last": 2, "train.checkpoint_writer": writer, **more}


def folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _Scaler:  # as DeepSpeed's LossScaler: an object in the optimizer state whose scale changes in place
    def __init__(self):
        self.cur_scale = 1.0


def test_a_snapshot_is_a_host_copy_that_later_updates_do_not_change_and_its_file_is_hashed(tmp_path):
    weight = torch.arange(6, dtype=torch.float32).requires_grad_()
    scaler = _Scaler()
    state = OrderedDict(w=weight, tied=weight, step=3, moments=[torch.ones(2, dtype=torch.bfloat16)], loss_scaler=scaler)
    state._metadata = {"": {"version": 1}}
    engine = BackgroundCheckpointEngine()
    copy = engine.snapshot(state, "model.pt")
    with torch.no_grad():
        weight.add_(100)
        state["moments"][0].zero_()
    scaler.cur_scale = 0.5
    assert copy["loss_scaler"].cur_scale == 1.0
    assert copy["w"].tolist() == [0, 1, 2, 3, 4, 5] and copy["tied"] is copy["w"] and not copy["w"].requires_grad
    assert copy["moments"][0].tolist() == [1, 1] and copy["moments"][0].dtype == torch.bfloat16 and copy["step"] == 3
    assert copy._metadata == {"": {"version": 1}}
    assert engine.snapshot(state, "model.pt")["w"].data_ptr() == copy["w"].data_ptr()  # the buffers are reused
    entry = write_hashed(copy, tmp_path / "model.pt", zipfile_serialization=True)
    data = (tmp_path / "model.pt").read_bytes()
    assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.load(tmp_path / "model.pt", weights_only=False)["w"].tolist() == [100, 101, 102, 103, 104, 105]


def test_a_file_whose_host_copy_does_not_fit_is_written_before_save_returns(tmp_path, monkeypatch, capsys):
    from pretrain import background_checkpoint

    engine = BackgroundCheckpointEngine()
    monkeypatch.setattr(background_checkpoint, "_host_bytes_available", lambda: 1000)
    engine.save({"small": torch.zeros(10)}, str(tmp_path / "small.pt"))  # 40 bytes: copied
    engine.save({"big": torch.zeros(1000)}, str(tmp_path / "big.pt"))  # 4000 bytes: written now
    (small, small_path, small_entry), (big, big_path, big_entry) = engine.take_pending()
    assert small_entry is None and small["small"].tolist() == [0.0] * 10 and not small_path.exists()
    data = big_path.read_bytes()
    assert big is None and big_entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert f"note: {big_path}: written before training goes on (its host copy needs 0.0 GB" in capsys.readouterr().out


def test_auto_writes_in_the_background_unless_an_offload_or_deepspeeds_own_writer_is_set():
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    ds_writer = {"checkpoint": {"writer": {"type": "python"}}}
    assert checkpoint_writer_of("auto", {"zero_optimization": {"stage": 2}}) == "background"
    assert checkpoint_writer_of("auto", offload) == checkpoint_writer_of("auto", ds_writer) == "blocking"
    assert checkpoint_writer_of("background", offload) == "background" and checkpoint_writer_of("blocking", {}) == "blocking"
    assert checkpoint_writer_problems("auto", ds_writer, Path("ds.json")) == checkpoint_writer_problems("background", {}, Path("x")) == []
    assert checkpoint_writer_problems("background", ds_writer, Path("ds.json")) == [
        "train.checkpoint_writer = background: ds.json sets checkpoint.writer (DeepSpeed's own writer), which the background "
        "writer would replace; remove one of them (or set train.checkpoint_writer to auto)"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_background_checkpoints_are_the_blocking_ones_and_a_kill_mid_write_resumes_bit_exact(setup, shards, tmp_path):
    nproc = SETUPS[setup][0]
    blocking, background = tmp_path / "blocking", tmp_path / "background"
    run_training(blocking, shards, nproc, **settings(setup, "blocking"))
    run_training(background, shards, nproc, **settings(setup, "background"))

    # The same losses, the same checkpoint files, the same consolidated fp32 weights.
    assert deterministic_metrics(background) == deterministic_metrics(blocking)
    assert checkpoint.complete_tags(background) == checkpoint.complete_tags(blocking) == ["step_00000006", "step_00000008"]
    final = "step_00000008"
    assert checkpoint.latest_tag(background) == final and checkpoint.damage(background, final) == []
    folder = checkpoint.checkpoints_dir(background) / final
    assert folder_files(folder) == folder_files(checkpoint.checkpoints_dir(blocking) / final)  # no written_rank*.json left
    record = checkpoint.read_record(folder)
    assert record["writer"] == "background" and record["blocked_seconds"] >= 0
    assert sorted(record["files"]) == [n for n in folder_files(folder) if n != "COMPLETE"]
    from pretrain.run_weights import run_state_dict  # any layout: ZeRO-0's too (zero1 on one rank runs as ZeRO-0)

    weights, _ = run_state_dict(background)
    expected, _ = run_state_dict(blocking)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)

    # Killed while step 6 is written (its thread sleeps after the files, before COMPLETE), with training
    # already past step 6: `latest` stays on step 3, and the rerun reproduces the uninterrupted run.
    killed = tmp_path / "killed"
    proc = start_training(killed, shards, nproc, {"LMFORGE_FAULT_SAVE_DELAY": "120@6", "LMFORGE_FAULT_STEP_DELAY": "0.2"},
                          **settings(setup, "background"))
    in_flight = checkpoint.checkpoints_dir(killed) / "step_00000006"
    wait_for(lambda: all((in_flight / f"rng_rank{r}.pt").exists() for r in range(nproc)) and max(logged_steps(killed), default=0) >= 7,
             proc, "step 7 while step 6 is being written")
    time.sleep(0.2)
    crash(proc)
    assert not (in_flight / "COMPLETE").exists()
    assert assert_latest_is_complete_and_intact(killed) == "step_00000003"
    run_training(killed, shards, nproc, **settings(setup, "background"))
    assert [m for m in deterministic_metrics(killed) if m["step"] > 3] == [m for m in deterministic_metrics(blocking) if m["step"] > 3]
    assert checkpoint.complete_tags(killed) == ["step_00000006", "step_00000008"] and not in_flight.joinpath(WRITTEN_RECORD.format(rank=0)).exists()


@pytest.mark.slow
def test_a_background_write_that_fails_is_reported_at_the_next_save_and_keeps_the_previous(shards, tmp_path):
    run = tmp_path / "run"
    proc = start_training(run, shards, 1, {"LMFORGE_FAULT_SAVE_ERROR": "6"}, **settings("zero1-1rank", "background"))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    folder = checkpoint.checkpoints_dir(run) / "step_00000006"
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder}: checkpoint not written (rank 0: No space left on device")
    assert f"the previous checkpoint {checkpoint.checkpoints_dir(run) / 'step_00000003'} is kept" in errors[0]
    assert not folder.exists() and checkpoint.latest_tag(run) == "step_00000003"
    assert json.loads((folder.parent / "step_00000003" / "COMPLETE").read_text())["writer"] == "background"


@pytest.mark.slow
def test_a_run_stopped_by_an_error_while_a_save_is_written_still_completes_that_save(shards, tmp_path):
    run = tmp_path / "run"
    # step 3's write sleeps 2 s; step 4's loss is NaN and one bad step stops the run meanwhile
    env = {"LMFORGE_FAULT_SAVE_DELAY": "2@3", "LMFORGE_FAULT_NAN_AT_STEP": "4"}
    proc = start_training(run, shards, 1, env, **settings("zero1-1rank", "background", **{"train.max_bad_steps": 1}))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 2 and "error: " in output, output[-3000:]
    assert "fault: sleeping 2s inside the save" in output
    assert assert_latest_is_complete_and_intact(run) == "step_00000003"
