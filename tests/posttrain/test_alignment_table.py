"""The alignment table end to end, reduced to fit CI: pretraining, SFT, GRPO and PPO through the real
`lmforge` verbs (DeepSpeed on CPU), measured on held-out stdlib function prefixes."""
import json
import subprocess
import sys

import pytest

from lmforge.run_layout import OWNER_FILE
from tests.posttrain.runs import REPO, env

REDUCED = ["--pretrain-steps", "100", "--sft-steps", "50", "--iterations", "15", "--train-prompts", "256",
           "--eval-prompts", "32"]
ROW_FIELDS = {"method", "iterations", "rollouts", "share_before", "share_after", "ratio", "seconds", "after",
              "rollout_reward"}


@pytest.mark.slow
def test_grpo_raises_the_share_of_parseable_bodies_over_the_sft_model_and_the_table_has_both_methods(tmp_path):
    out = tmp_path / "table"
    result = subprocess.run([sys.executable, "-m", "posttrain.alignment_table", "--out", str(out), *REDUCED],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    table = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["grpo", "ppo"]
    before = table["before"]["valid_rate"]
    assert table["before"]["completions"] == 32 * 4
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
        assert row["iterations"] == 15 and row["rollouts"] == 15 * 8 * 8
        assert row["share_before"] == before and 0.0 <= row["share_after"] <= 1.0
        assert row["ratio"] == pytest.approx(row["share_after"] / before)
        assert row["seconds"] > 0
    assert set(table["run_seconds"]) == {"pretrain", "sft", "grpo", "ppo"}
    assert "| grpo | 15 | 960 |" in result.stdout and "| ppo | 15 | 960 |" in result.stdout
    # Measured with these settings (CPU, one thread a run): 0.039 -> 0.195 (5 -> 25 of 128 completions),
    # PPO 0.047. The share after has a standard error of ~0.035 (binomial, 128 samples), so a gain of
    # 0.08 (half the measured one, over two standard errors) and the 2x leave room for noise.
    grpo = rows["grpo"]
    assert grpo["share_after"] >= before + 0.08 and grpo["share_after"] >= 2 * before, (before, grpo["share_after"])


def test_settings_that_cannot_run_are_refused_in_one_line_before_anything_is_created(tmp_path, capsys):
    from lmforge.errors import run_cli
    from posttrain.alignment_table import main

    assert run_cli(main, ["--out", str(tmp_path / "t"), "--iterations", "0", "--group-size", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        "error: --iterations = 0: must be at least 1",
        "error: --group-size = 1: must be at least 2 (GRPO compares responses to one prompt)"]
    assert not (tmp_path / "t").exists()


def test_a_rerun_with_other_settings_into_the_same_out_is_refused(tmp_path, capsys):
    from lmforge.errors import run_cli
    from posttrain.alignment_table import SETTINGS_FILE, TableSettings, check_same_settings, main

    check_same_settings(tmp_path, TableSettings())
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["iterations"] == TableSettings().iterations
    assert run_cli(main, ["--out", str(tmp_path), "--iterations", "7"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / SETTINGS_FILE}: the runs in {tmp_path} were made with other settings "
        f"(--iterations {TableSettings().iterations} -> 7); use another --out, or delete it to start over")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OWNER_FILE, SETTINGS_FILE])


def test_an_out_holding_someone_elses_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    from lmforge.errors import run_cli
    from posttrain.alignment_table import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    (out / "data" / "eval_prompts.jsonl").write_text('{"prompt": "mine"}\n')
    assert run_cli(main, ["--out", str(out)]) == 2
    (line,) = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("error:")]
    assert line.startswith(f"error: --out {out}: exists and is not empty, with files lmforge did not write")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["data", "data/eval_prompts.jsonl", "notes.txt"]
    assert (out / "data" / "eval_prompts.jsonl").read_text() == '{"prompt": "mine"}\n'
