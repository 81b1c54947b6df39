import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_dry_run_prints_the_rate_table_and_flat_memory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.data_prep", "--dry-run", "--repeat", "1", "--json", str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for row in ("single-core encode (tokens/s)", "end-to-end, ", "ratio (goal >= 0.90)", "peak RSS worker"):
        assert row in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["end_to_end"]["tokens"] == results["single_core"]["tokens"] > 0
    assert results["end_to_end_corpus_twice"]["tokens"] == 2 * results["end_to_end"]["tokens"]
    assert 0 < results["ratio"] < 2
    assert 0 < results["end_to_end"]["main_peak_rss_mib"] < 1024
