"""bench/large_model_loop.py runs the real loop for a few steps and reports its columns (tiny preset, CPU)."""
import json
import subprocess
import sys

from tests.pretrain.training_runs import run_env


def test_prints_each_step_and_one_result_line_with_every_column(tiny_corpus_shards, tmp_path):
    command = [sys.executable, "-m", "bench.large_model_loop", "tiny", "3", f"data.path=[{tiny_corpus_shards.shard_dir}]",
               "deepspeed.config=ds_configs/zero0.json"]
    done = subprocess.run(command, env=run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1", "2", "3"]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["preset"] == "tiny" and result["tokens_per_step"] > 0 and result["tok_s_median"] > 0
    assert 0 < result["params_b"] < 0.01 and result["host_peak_gib"] > 0.1 and result["host_bytes_per_param"] > 0
    assert result["gpu_peak_gib"] is None  # no GPU here
