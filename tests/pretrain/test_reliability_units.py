"""Fast, single-process checks of the reliability pieces: checkpoint records, pruning, failed saves,
damage detection and fallback, RNG round trip, fault hooks, signals, metrics and disk checks."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from pretrain import checkpoint, universal_checkpoint, faults, resume, run_checks
from pretrain.config import PretrainConfig, TrainConfig
from pretrain.guarded_step import GuardedStep, StepOutcome
from pretrain.metrics import MetricsWriter, read_metrics
from pretrain.model import ModelConfig
from pretrain.preemption import PreemptionSignals


class FakeEngine:
    """The part of DeepSpeed's engine that checkpoint.save uses, writing one small file."""

    dp_world_size = 1

    def __init__(self, payload: bytes = b"weights"):
        self.payload = payload

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(self.payload + json.dumps(client_state).encode())


def save(run_dir: Path, step: int, keep_last: int = 3, **record) -> str:
    return checkpoint.save(FakeEngine(), run_dir, step, {"step": step}, keep_last, record or None)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def test_save_records_size_and_sha256_of_every_file_and_then_moves_latest(tmp_path):
    tag = save(tmp_path, 2, model={"n_layers": 2})
    folder = tmp_path / "checkpoints" / tag
    record = checkpoint.read_record(folder)
    assert (tag, latest(tmp_path)) == ("step_00000002", "step_00000002")
    assert record["step"] == 2 and record["world_size"] == 1 and record["zero_stage"] == 0
    assert record["data_parallel_size"] == 1 and record["model"] == {"n_layers": 2}
    assert sorted(record["files"]) == ["mp_rank_00_model_states.pt", "rng_rank0.pt"]
    for name, entry in record["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_keep_last_keeps_the_newest_complete_ones_and_removes_partial_folders(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=2)
    partial = tmp_path / "checkpoints" / "step_00000009"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    save(tmp_path, 4, keep_last=2)
    assert checkpoint.complete_tags(tmp_path) == ["step_00000003", "step_00000004"]
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000003", "step_00000004"]


def test_a_save_that_hits_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 2, keep_last=1)
    monkeypatch.setenv(faults.SAVE_ERROR, "4")
    with pytest.raises(LmforgeError) as err:
        save(tmp_path, 4, keep_last=1)
    message = str(err.value)
    assert "step_00000004: checkpoint not written (rank 0: No space left on device" in message
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / 'step_00000002'} is kept" in message
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()
    assert latest(tmp_path) == "step_00000002" and checkpoint.complete_tags(tmp_path) == ["step_00000002"]
    assert checkpoint.damage(tmp_path, "step_00000002") == []


def test_saving_a_tag_again_replaces_its_stale_folder_entirely(tmp_path):
    save(tmp_path, 2)
    stale = tmp_path / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    stale.write_bytes(b"from a run on more ranks")
    save(tmp_path, 2)
    assert not stale.exists()
    assert sorted(checkpoint.read_record(stale.parent)["files"]) == ["mp_rank_00_model_states.pt", "rng_rank0.pt"]


@pytest.mark.parametrize("harm, expected", [
    (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "sha256 does not match the checkpoint record"),
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "bytes, the checkpoint record says"),
    (lambda p: p.unlink(), "missing (listed in"),
])
def test_damage_names_a_flipped_truncated_or_missing_file(tmp_path, harm, expected):
    tag = save(tmp_path, 2)
    target = tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    harm(target)
    problems = checkpoint.damage(tmp_path, tag)
    assert len(problems) == 1 and problems[0].startswith(f"{target}: ") and expected in problems[0]


def test_a_damaged_latest_is_an_error_unless_fallback_is_asked_for(tmp_path, capsys):
    save(tmp_path, 2)
    save(tmp_path, 4)
    damaged = tmp_path / "checkpoints" / "step_00000004" / "rng_rank0.pt"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    with pytest.raises(LmforgeError) as err:
        resume.choose_tag(tmp_path, fallback=False)
    assert str(err.value).startswith(f"{damaged}: ")
    assert "--resume-fallback" in str(err.value) and "step_00000002" in str(err.value)
    assert resume.choose_tag(tmp_path, fallback=True) == "step_00000002"
    assert f"falling back to {tmp_path / 'checkpoints' / 'step_00000002'}" in capsys.readouterr().out
    assert latest(tmp_path) == "step_00000002" and checkpoint.complete_tags(tmp_path) == ["step_00000002"]
    assert (damaged.parent / checkpoint.DAMAGED_MARKER).is_file()
    save(tmp_path, 3)
    assert not damaged.parent.exists()  # pruned once a newer checkpoint is complete


def test_fallback_without_an_intact_older_checkpoint_is_an_error(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(LmforgeError, match="no intact earlier checkpoint"):
        resume.choose_tag(tmp_path, fallback=True)
    with pytest.raises(LmforgeError, match="there is no earlier complete checkpoint"):
        resume.choose_tag(tmp_path, fallback=False)


def test_latest_naming_a_missing_checkpoint_is_an_error_naming_it(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000007")
    with pytest.raises(LmforgeError, match="names 'step_00000007', which is missing or incomplete.*step_00000002"):
        resume.choose_tag(tmp_path, fallback=False)


def test_without_latest_the_newest_complete_checkpoint_is_used(tmp_path):
    """Killed between writing COMPLETE and `latest`: COMPLETE is the commit point."""
    assert resume.choose_tag(tmp_path, fallback=False) is None
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert resume.choose_tag(tmp_path, fallback=False) == "step_00000004"


def test_a_checkpoint_written_before_records_still_resumes(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000008"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text("8\n")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000008")
    assert checkpoint.read_record(folder) == {"step": 8}
    assert resume.choose_tag(tmp_path, fallback=False) == "step_00000008"


def test_a_checkpoint_of_another_model_is_refused_naming_the_key(tmp_path):
    config = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=512)
    record = resume.record_for(PretrainConfig(model=config), 4)
    resume.check_model(record, config, tmp_path)
    with pytest.raises(LmforgeError, match=r"written for a different model \(model.n_layers = 2 there, 3 in the config\)"):
        resume.check_model(record, ModelConfig(n_layers=3, d_model=32, n_heads=4, vocab_size=512), tmp_path)


@pytest.mark.parametrize("saved_dp, saved_stage, dp, stage, expected", [
    (2, 1, 2, 1, False), (2, 1, 1, 1, True), (2, 3, 4, 3, True), (2, 0, 1, 0, False), (None, None, 4, 3, False),
])
def test_universal_loading_only_for_a_zero_checkpoint_on_another_number_of_ranks(saved_dp, saved_stage, dp, stage, expected):
    record = {"data_parallel_size": saved_dp, "zero_stage": saved_stage}
    assert universal_checkpoint.needs_universal(record, dp, stage, Path("ckpt")) is expected


def test_resuming_with_another_zero_stage_is_refused_except_zero0s_checkpoint_at_zero_1_2():
    with pytest.raises(LmforgeError, match="written with ZeRO-0 but deepspeed.config is ZeRO-3; resume with a ZeRO-0 JSON"):
        universal_checkpoint.needs_universal({"data_parallel_size": 1, "zero_stage": 0}, 1, 3, Path("ckpt"))
    with pytest.raises(LmforgeError, match="written with ZeRO-1 but deepspeed.config is ZeRO-0; resume with a ZeRO-1 JSON"):
        universal_checkpoint.needs_universal({"data_parallel_size": 1, "zero_stage": 1}, 1, 0, Path("ckpt"))
    # resume.plan loads these itself (pretrain.universal_checkpoint.load_zero0_optimizer_state)
    assert [universal_checkpoint.loads_zero0_into_zero({"zero_stage": 0}, stage) for stage in (0, 1, 2, 3)] == [False, True, True, False]
    assert universal_checkpoint.loads_zero0_into_zero({"zero_stage": 1}, 2) is False


def test_rng_states_round_trip_through_weights_only_loading(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_rng_files_of_the_earlier_numpy_format_still_load(tmp_path):
    np.random.seed(5)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(legacy, tmp_path / "rng.pt")
    expected = np.random.rand(2)
    checkpoint.restore_rng_state(checkpoint._load_rng(tmp_path / "rng.pt"))
    assert np.array_equal(np.random.rand(2), expected)


def test_fault_hooks_are_inert_unless_set(monkeypatch):
    loss = torch.tensor(2.0, requires_grad=True)
    assert faults.corrupt_loss(loss, 3, 0) is loss
    faults.during_save(3, "x")  # no delay, no error
    monkeypatch.setenv(faults.NAN_AT_STEP, "3,5")
    assert torch.isnan(faults.corrupt_loss(loss, 5, 0)) and faults.corrupt_loss(loss, 5, 1) is loss
    monkeypatch.setenv(faults.NAN_AT_STEP, "")
    monkeypatch.setenv(faults.INF_GRAD_AT_STEP, "4")
    weight = torch.tensor(3.0, requires_grad=True)
    out = faults.corrupt_loss(weight * 2, 4, 0)
    out.backward()
    assert out.item() == 6.0 and weight.grad.item() == float("inf")
    monkeypatch.setenv(faults.SAVE_ERROR, "7")
    with pytest.raises(OSError) as err:
        faults.during_save(7, "folder")
    assert err.value.errno == errno.ENOSPC


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_recorded_not_acted_on(sig):
    signals = PreemptionSignals().install()
    try:
        assert not signals.requested
        os.kill(os.getpid(), sig)
        assert signals.requested and signals.received == sig.name
        os.kill(os.getpid(), signal.SIGTERM)  # a second one does not change the first
        assert signals.received == sig.name
    finally:
        signals.restore()
    assert signal.getsignal(sig) == signal.SIG_DFL


def test_metrics_write_non_finite_values_as_null(tmp_path):
    writer = MetricsWriter(tmp_path, True, False, 0)
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "skipped_steps": 1})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None, "skipped_steps": 1}]
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_disk_space_check_counts_parameters_without_building_the_model(tmp_path):
    huge = ModelConfig(n_layers=96, d_model=12288, n_heads=96, vocab_size=50257)  # ~175B parameters
    assert run_checks.parameter_count(huge) > 170e9
    with pytest.raises(LmforgeError, match=r"run.dir = .*free, but checkpoints need .* lower train.keep_last"):
        run_checks.check_disk_space(tmp_path, huge, TrainConfig(keep_last=3))
    with pytest.raises(LmforgeError, match=r"run.dir = .*/new/run: .*free, but checkpoints need"):
        run_checks.check_disk_space(tmp_path / "new" / "run", huge, TrainConfig(keep_last=3))
    assert not (tmp_path / "new").exists()
    run_checks.check_disk_space(tmp_path, ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=512), TrainConfig(keep_last=3))


def test_a_run_dir_under_a_regular_file_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError, match=r"run.dir = .*file/run: not writable \(Not a directory\)"):
        run_checks.check_run_dir(tmp_path / "file" / "run")


def test_only_consecutive_bad_steps_count_towards_max_bad_steps():
    engine = type("Engine", (), {"optimizer": object()})()
    guard = GuardedStep(engine, max_bad_steps=3, fp16=False)
    good, bad = (StepOutcome(torch.tensor(1.0), applied, applied is False, False) for applied in (True, False))
    for step, outcome in enumerate([bad, bad, good, bad, bad, good, bad], start=1):
        guard.check(outcome, step, lambda: "hint")
    assert guard.consecutive_bad == 1 and guard.first_bad_step == 7
    guard.check(bad, 8, lambda: "hint")
    with pytest.raises(LmforgeError, match=r"^3 optimizer steps in a row \(7-9\) .* the weights are still those of step 6; hint$"):
        guard.check(bad, 9, lambda: "hint")


def test_cpu_adam_after_a_load_updates_exactly_as_without_the_restart():
    """DeepSpeed's CPU FusedAdam keeps beta^t as running products; a restarted process would start
    them with pow(), which differs in the last bit at t = 8 for beta2 = 0.95 (checkpoint.load replays)."""
    import copy

    from deepspeed.ops.adam import FusedAdam

    grads = [torch.randn(4096, generator=torch.Generator().manual_seed(t)) for t in range(8)]

    def adam(weights):
        param = torch.nn.Parameter(weights.clone())
        return param, FusedAdam([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    def step(param, opt, grad):
        param.grad = grad.clone()
        opt.step()

    param, opt = adam(torch.zeros(4096))
    for grad in grads[:7]:
        step(param, opt, grad)
    saved = (param.detach().clone(), copy.deepcopy(opt.state_dict()))
    step(param, opt, grads[7])
    uninterrupted = param.detach().clone()

    def resumed(replay: bool) -> torch.Tensor:
        # As in a restarted process: other betas make the kernel start its products over with pow().
        _, fresh = adam(torch.ones(1))
        fresh.multi_tensor_adam(2048, fresh._dummy_overflow_buf, [[torch.empty(0)]] * 4, 0.0, 0.5, 0.5, 0.0, 1, 1, 1, 0.0)
        param, opt = adam(saved[0])
        opt.load_state_dict(copy.deepcopy(saved[1]))
        if replay:
            checkpoint._replay_cpu_adam_products(opt)
        step(param, opt, grads[7])
        return param.detach()

    assert torch.equal(resumed(replay=True), uninterrupted)
    assert not torch.equal(resumed(replay=False), uninterrupted)  # what the replay is for
