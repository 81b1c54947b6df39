"""bench.startup_time on the CPU (the tiny preset): the raw script's row and lmforge train's, in one table."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.startup_time import row_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_raw_and_lmforge_rows_time_their_first_step_in_one_table(tiny_corpus_shards):
    result = subprocess.run(
        [sys.executable, "-m", "bench.startup_time", "--config", "tiny", "--set", f"data.path=[{tiny_corpus_shards.shard_dir}]",
         "--set", "train.max_steps=12", "--set", "train.warmup_steps=2", "--raw", "--fresh-caches"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [l for l in lines if "] step 12 loss " in l], "the raw script's lines are stamped and printed"
    header = lines.index(next(l for l in lines if l.startswith("command ")))
    assert "first step × raw" in lines[header]
    raw, lmforge = (l.rsplit(None, 5) for l in lines[header + 1:header + 3])
    assert raw[0] == "raw PyTorch (bench.raw_train)" and lmforge[0] == "lmforge train --config tiny"
    for name, first_line, first_step, total, tokens, ratio in (raw, lmforge):
        assert 0 < float(first_line) <= float(first_step) <= float(total), name
    assert math.isnan(float(raw[4])) and float(lmforge[4]) > 0  # the raw row reports no tokens/s
    assert float(raw[5]) == 1.0
    assert float(lmforge[5]) == pytest.approx(float(lmforge[2]) / float(raw[2]), rel=0.1)


def test_fresh_caches_give_a_row_its_own_inductor_and_triton_caches_and_otherwise_the_environment_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/users/cache")
    fresh = row_env(tmp_path, fresh_caches=True)
    assert fresh["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor_cache_dir")
    assert fresh["TRITON_CACHE_DIR"] == str(tmp_path / "triton_cache_dir")
    assert row_env(tmp_path, fresh_caches=False)["TORCHINDUCTOR_CACHE_DIR"] == "/users/cache"


def test_the_raw_script_trains_the_configs_model_on_the_shards_and_prints_each_step(tiny_corpus_shards, capsys):
    from bench.raw_train import main
    from lmforge.errors import run_cli

    sets = ["--set", f"data.path=[{tiny_corpus_shards.shard_dir}]", "--set", "train.max_steps=20", "--set", "train.warmup_steps=2"]
    assert run_cli(main, ["--config", "tiny", *sets]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:2] for l in lines] == [["step", str(n)] for n in range(1, 21)]
    losses = [float(l.split()[3]) for l in lines]
    assert losses[0] == pytest.approx(math.log(tiny_corpus_shards.vocab_size), rel=0.1)  # the shards' vocabulary
    assert sum(losses[-5:]) < sum(losses[:5])


def test_the_raw_script_refuses_shards_without_a_manifest_in_one_line(tmp_path, capsys):
    from bench.raw_train import main
    from lmforge.errors import run_cli

    assert run_cli(main, ["--config", "tiny", "--set", f"data.path=[{tmp_path}]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: data.path {tmp_path}: no manifest.json (make shards with `lmforge prep shards`)"]
