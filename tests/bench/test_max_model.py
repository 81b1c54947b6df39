"""bench/max_model.py on the CPU with a tiny preset, so the script cannot rot between GPU runs (no timing assertion)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rows_print_one_table_with_params_tokens_host_peak_and_the_timed_save(tmp_path):
    out = tmp_path / "rows.json"
    rows = ["tiny:zero3_offload:train.micro_batch_size=2+train.seq_len=32+save.writer=python",
            "tiny:zero1:train.seq_len=32+save.writer=background"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.max_model", "--rows", *rows, "--steps", "1", "--save", "--save-dir", str(tmp_path / "ckpt"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("max_model on cpu"):]
    assert "tok/step" in table and "B/param" in table and all(row in table for row in rows)
    data = json.loads(out.read_text())
    assert [r["row"] for r in data] == rows
    first, second = data
    assert first["params"] == second["params"] > 4_000_000  # zero.Init's ds_numel counts the whole model
    assert first["tokens_per_step"] == 2 * 32 and second["tokens_per_step"] == 8 * 32  # tiny's micro-batch 8
    assert first["writer"] == json.dumps({"type": "python", "decoupled": False}) and second["writer"] == '"background"'
    assert all(r["checkpoint_bytes"] > 12 * r["params"] and r["host_peak_bytes"] > 0 and r["mfu"] is None for r in data)
    assert first["steps_during_write"] == first["wait_seconds"] == 0 and 0 <= second["steps_during_write"] <= 1  # blocking returns complete
    assert all(r["write_seconds"] >= r["save_seconds"] > 0 and r["first_save_seconds"] > 0 for r in data)
    # ZeRO-1 under torch_autocast saves the fp32 weights twice: the module's (4 B/param) and the master partition's
    files = second["checkpoint_files"]
    assert files["mp_rank_00_model_states.pt"] > 4 * second["params"] and files["zero_pp_rank_0_mp_rank_00_optim_states.pt"] > 12 * second["params"]
    for name in ("tiny-zero3_offload-python", "tiny-zero1-background"):
        assert (tmp_path / "ckpt" / name / "checkpoints" / "latest").read_text() == "step_00000002"
        assert (tmp_path / "ckpt" / name / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    compare = subprocess.run([sys.executable, "-m", "launch.memory_compare", str(out)], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-3000:]
    lines = compare.stdout.splitlines()
    assert lines[0].split() == ["row", "GPU", "GiB", "estimate", "diff", "host", "GiB", "estimate", "diff"]
    assert [line.split()[0] for line in lines[1:]] == rows
    assert all(line.split()[1:4] == ["-", "-", "-"] and line.endswith("%") for line in lines[1:])  # no GPU here: host only


@pytest.mark.slow
def test_an_adamw8bit_row_saves_once_with_saves_1(tmp_path):
    out = tmp_path / "rows.json"
    row = "tiny:zero0_adamw8bit:train.optimizer=adamw8bit+train.seq_len=32+save.writer=background"
    result = subprocess.run(
        [sys.executable, "-m", "bench.max_model", "--rows", row, "--steps", "1", "--save", "--saves", "1",
         "--save-dir", str(tmp_path / "ckpt"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (data,) = json.loads(out.read_text())
    assert data["config"]["train"]["optimizer"] == "adamw8bit"
    # bf16 weights (2 B/param) and two 8-bit moments with their scales: ~4 B/param, not fp32 AdamW's 12
    assert 3.5 * data["params"] < data["checkpoint_bytes"] < 6 * data["params"]
    checkpoints = tmp_path / "ckpt" / "tiny-zero0_adamw8bit-background" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000001"
    assert data["first_save_seconds"] == data["save_seconds"] > 0


def test_a_save_folder_holding_someone_elses_files_is_refused_before_any_row_runs(tmp_path):
    row = "tiny:zero1:train.seq_len=32+save.writer=background"
    folder = tmp_path / "ckpt" / "tiny-zero1-background"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("a user's file\n")
    result = subprocess.run(
        [sys.executable, "-m", "bench.max_model", "--rows", row, "--steps", "1", "--save", "--save-dir", str(tmp_path / "ckpt")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--save-dir" in lines[0] and "notes.txt" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and result.stdout == ""
