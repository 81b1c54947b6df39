"""launch/smoke.sh on CPU end to end, and the loss check that makes it fail."""
from __future__ import annotations

import json
import subprocess

import pytest

from launch.smoke_report import main as smoke_report
from tests.launch.launch_runs import REPO, launch_env, logged_steps


@pytest.mark.slow
def test_smoke_sh_trains_then_reports_speed_memory_and_a_sample(shards, tmp_path):
    run_dir = tmp_path / "smoke"
    args = ["--set", "train.max_steps=40", "--set", "run.log_interval=5", "--set", "train.micro_batch_size=4",
            "--set", "train.seq_len=32", "--set", "model.d_model=32", "--set", "run.tensorboard=false"]
    result = subprocess.run([str(REPO / "launch" / "smoke.sh"), *args], cwd=REPO, capture_output=True, text=True,
                            env=launch_env(DATA=str(shards), RUN_DIR=str(run_dir)), timeout=600)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert out.startswith("ok: tiny")  # preflight first
    assert logged_steps(run_dir) == list(range(5, 45, 5))
    assert "tokens/s" in out and "MFU          n/a" in out and "GB peak per rank" in out
    assert "--- sample (step_00000040) ---" in out


def _write_losses(run_dir, losses):
    run_dir.mkdir()
    lines = [{"step": 10 * (i + 1), "loss": loss, "tokens_per_second": 1000.0 + i, "mfu": 0.4, "memory_gb": 1.5}
             for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_smoke_report_fails_when_the_loss_does_not_fall(tmp_path, capsys):
    _write_losses(tmp_path / "run", [6.0, 5.5, 6.1])
    assert smoke_report(["--set", f"run.dir={tmp_path / 'run'}", "--no-sample"]) == 1
    captured = capsys.readouterr()
    assert "error: the loss did not fall (6.0000 at step 10 -> 6.1000 at step 30)" in captured.err


def test_smoke_report_gives_median_speed_mfu_and_peak_memory(tmp_path, capsys):
    _write_losses(tmp_path / "run", [6.0, 5.0, 4.0, 3.0])
    assert smoke_report(["--set", f"run.dir={tmp_path / 'run'}", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "loss         6.0000 at step 10 -> 3.0000 at step 40" in out
    assert "tokens/s     1,002 (median of 3 logged intervals)" in out  # 1001, 1002, 1003: the first is start-up
    assert "MFU          40.0%" in out and "memory       1.50 GB peak per rank" in out
