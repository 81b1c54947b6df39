"""The CPU host-time benchmark's --dry-run, so the script cannot rot."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_prints_a_row_per_zero_stage_with_positive_times():
    result = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--dry-run", "--stages", "0,1,2", "--profile", "--top", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "ms/step"])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert result.stdout.count("cProfile, top 3") == 3
    assert all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)  # median and fastest ms/step
    assert float(rows[0][2]) == float(rows[0][4]) == 1.0  # the ratio columns are to ZeRO-0
    assert all(row[5] == "196" for row in rows)  # lmforge's gpt2-124m's tensor count
