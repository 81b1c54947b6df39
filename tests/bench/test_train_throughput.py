"""The GPU throughput benchmark's --dry-run on the CPU, so the script cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_prints_one_table_and_writes_the_same_as_json(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "--dry-run", "--variants", "baseline,zero0,zero2:ckpt", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("tiny: batch 2 × seq 32"):]
    assert "variant" in table and "× baseline" in table
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["baseline", "zero0", "zero2:ckpt"]
    assert all(r["tokens_per_second"] > 0 for r in data["results"])
    assert data["results"][0]["ratio_to_baseline"] == 1.0


@pytest.mark.slow
def test_dry_run_times_the_real_loop_and_a_raw_script_on_shards(tmp_path, tiny_corpus_shards):
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "--dry-run", "--data", str(tiny_corpus_shards.shard_dir),
         "--variants", "raw,loop:zero0,loop:zero2,loop:zero0:train.compile_mode=bogus,baseline", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "× raw" in result.stdout
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["raw", "loop:zero0", "loop:zero2", "loop:zero0:train.compile_mode=bogus", "baseline"]
    raw, zero0, zero2, bogus, baseline = data["results"]
    assert all(r["tokens_per_second"] > 0 for r in (raw, zero0, zero2, baseline))
    assert raw["ratio_to_baseline"] == 1.0
    # A variant that cannot run is a row saying why; the others' table stays.
    assert bogus["tokens_per_second"] == 0 and bogus["note"].startswith("failed: ") and "compile_mode" in bogus["note"]
    # Each loop row ends with its last logged loss: the same seed and batches at ZeRO-0 and ZeRO-2 (fp32 on a CPU).
    losses = [float(r["note"].split("loss ")[1].split()[0]) for r in (zero0, zero2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
