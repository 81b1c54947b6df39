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


def test_a_trace_folder_holding_someone_elses_files_is_refused_before_anything_runs(tmp_path):
    """--trace writes its traces only into a new, empty or earlier --trace folder (lmforge.ownership)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file\n")
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "--dry-run", "--variants", "baseline", "--trace", str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--trace" in lines[0] and "notes.txt" in lines[0] and "nothing was changed" in lines[0]
    assert result.stdout == ""  # refused before any variant ran
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "a user's file\n"


def test_an_earlier_trace_folder_is_reused(tmp_path):
    from lmforge import ownership

    folder = ownership.claim(tmp_path / "traces", "bench-trace", "bench.train_throughput")
    (folder / "raw.json.gz").write_bytes(b"old trace")
    assert ownership.check_output(folder, "bench-trace", "bench.train_throughput", "--trace") == "bench-trace"
    run_dir = ownership.claim(tmp_path / "run", "run", "train")
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="is a pretraining run directory"):
        ownership.check_output(run_dir, "bench-trace", "bench.train_throughput", "--trace")


def test_deepcompile_rows_run_after_the_others_in_the_order_given():
    from bench.train_throughput import deepcompile_last

    # ds_configs/zero3.json turns DeepCompile on; zero2.json and the synthetic rows do not
    variants = ["raw", "loop:zero3", "loop:zero2", "loop:zero3:train.seed=2", "zero3", "loop:zero0"]
    assert deepcompile_last(variants) == ["raw", "loop:zero2", "zero3", "loop:zero0", "loop:zero3", "loop:zero3:train.seed=2"]


def test_two_rows_of_one_json_write_their_traces_to_two_files():
    """An H200 run of zero0 and zero0:train.compile_scope=blocks with --trace left one file: the second row's
    trace had been named after the JSON alone and replaced the first."""
    from bench.train_throughput import trace_file_name

    names = [trace_file_name(row) for row in ("raw", "zero0", "zero0:train.compile_scope=blocks", "zero0:train.compile_mode=reduce-overhead")]
    assert names[:2] == ["raw.json.gz", "loop-zero0.json.gz"]
    assert len(set(names)) == len(names) and all("/" not in n for n in names)
