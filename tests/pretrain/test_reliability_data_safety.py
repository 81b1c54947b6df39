"""Crash-consistent files, full disks and resume records (issue 19): a torn metrics line is dropped with
a note and skipped by readers; a full disk anywhere is one line naming the path and the space needed,
the partial output removed and everything complete kept (on real small tmpfs filesystems); a resume
with other data, or from a damaged record, or of a finished run, says so."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from pretrain import checkpoint
from pretrain.metrics import MetricsWriter, parse_lines, read_metrics
from tests.lmforge.test_ownership import assert_refused, lmforge, train_args
from tests.pretrain.test_reliability_bad_inputs import snapshot
from tests.pretrain.training_runs import start_training, wait_for_checkpoint


@pytest.fixture()
def ws(finished_tiny_run, tmp_path) -> Path:
    shutil.copytree(finished_tiny_run, tmp_path / "ws")
    return tmp_path / "ws"


@pytest.fixture()
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "2M"); unmounted at teardown. Skips without the permission."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()[:200]})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file taking all but about `leave` bytes of the disk."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


# ---- torn lines ---------------------------------------------------------------------------------------------
def test_a_torn_last_line_is_dropped_on_resume_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    MetricsWriter(tmp_path, True, False, 2).close()
    assert "dropped 1 torn line(s) (line 3" in capsys.readouterr().out
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'


def test_readers_skip_torn_binary_and_non_record_lines(tmp_path):
    data = b'{"step": 1, "loss": 5.0}\n\xff\xfe garbage\n[1, 2]\n{"loss": 1}\n{"step": 2, "val_loss": 4.5}\n{"step": 3, "lo'
    records, torn = parse_lines(data)
    assert [r["step"] for r in records] == [1, 2] and torn == [2, 3, 4, 6]
    (tmp_path / "metrics.jsonl").write_bytes(data)
    assert read_metrics(tmp_path) == records
    from run_tools.plot import plot_losses

    assert plot_losses(tmp_path).is_file()
    # a loss.png of the user's, in a folder that is not an lmforge run, is never replaced
    (tmp_path / "loss.png").write_bytes(b"my figure")
    with pytest.raises(LmforgeError, match="is not an lmforge run directory; nothing was changed"):
        plot_losses(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == b"my figure"


def test_a_fresh_start_keeps_an_earlier_attempts_metrics_aside(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    writer = MetricsWriter(tmp_path, True, False, 0)
    writer.write({"step": 1, "loss": 6.0})
    aside = [p for p in tmp_path.glob("metrics.*.jsonl")]
    assert len(aside) == 1 and aside[0].read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
    assert "are kept as" in capsys.readouterr().out
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 6.0}]


@pytest.mark.slow
def test_train_resumes_and_plot_reads_past_a_torn_metrics_line(ws):
    with open(ws / "run" / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 3, "loss": 4.1, "lr": 0.00')  # a kill in the middle of a write
    plotted = lmforge("plot", ws / "run")
    assert plotted.returncode == 0 and (ws / "run" / "loss.png").is_file(), plotted.stderr[-2000:]
    result = lmforge(*train_args(ws, ws / "run", "train.max_steps=4", "run.log_interval=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 1 torn line(s)" in result.stdout
    assert [r["step"] for r in read_metrics(ws / "run") if "loss" in r] == [1, 2, 3, 4]
    assert all(json.loads(line) for line in (ws / "run" / "metrics.jsonl").read_text().splitlines())


# ---- full disks ---------------------------------------------------------------------------------------------
class FileWritingEngine:
    """Stands in for DeepSpeed's engine: save_checkpoint writes one torch.save file of `numel` floats."""

    dp_world_size = 1

    def __init__(self, numel: int):
        self.numel = numel

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(Path(root) / tag, exist_ok=True)
        torch.save({"w": torch.zeros(self.numel)}, Path(root) / tag / "mp_rank_00_model_states.pt")

    def zero_optimization_stage(self):
        return 0


def test_torch_save_on_a_full_disk_is_one_line_the_partial_folder_removed_the_previous_kept(small_disk):
    run = small_disk("1M")
    checkpoint.save(FileWritingEngine(20_000), run, 2, {"step": 2}, keep_last=2)
    with pytest.raises(LmforgeError) as failed:
        checkpoint.save(FileWritingEngine(400_000), run, 4, {"step": 4}, keep_last=2)  # 1.6 MB on a 1 MB disk
    message = str(failed.value)
    assert f"{run}/checkpoints/step_00000004: checkpoint not written (rank 0:" in message
    assert re.search(r"out of space \(about \d+\.\d KB needed, [\d.]+ KB free on the filesystem of .*/checkpoints\)", message)
    assert "the partial folder was removed" in message and f"the previous checkpoint {run}/checkpoints/step_00000002 is kept" in message
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert checkpoint.latest_tag(run) == "step_00000002" and checkpoint.damage(run, "step_00000002") == []


def test_a_python_write_on_a_full_disk_names_the_file_and_its_size(small_disk):
    from lmforge.files import atomic_write_bytes

    disk = small_disk("64k")
    atomic_write_bytes(disk / "kept.bin", b"k" * 1000)
    with pytest.raises(LmforgeError, match=r"big.bin: out of space \(about 200.0 KB needed, .* free on the filesystem"):
        atomic_write_bytes(disk / "big.bin", b"x" * 200_000)
    assert sorted(p.name for p in disk.iterdir()) == ["kept.bin"]


def test_a_config_or_owner_marker_write_on_a_full_disk_is_one_line_and_leaves_no_temp_file(small_disk):
    from lmforge import ownership
    from lmforge.config import save_config
    from pretrain.config import load_pretrain_config

    disk = small_disk("1M")
    filler = fill(disk, leave=0)
    with pytest.raises(LmforgeError, match=r"config.yaml: out of space \(about [\d.]+ [KM]?B needed, 0 B free"):
        save_config(load_pretrain_config("tiny"), disk / "config.yaml")
    with pytest.raises(LmforgeError, match=r".lmforge-owner.json: out of space \(about 4.1 KB needed"):
        ownership.write_owner(disk, "run", "train")
    assert list(disk.iterdir()) == [filler]


@pytest.mark.slow
def test_a_training_save_on_a_really_full_disk_keeps_the_previous_checkpoint_and_the_rerun_finishes(ws, small_disk):
    disk = small_disk("48M")
    run = disk / "run"
    proc = start_training(run, ws / "shards", extra_env={"LMFORGE_FAULT_STEP_DELAY": "0.3"},
                          **{"train.max_steps": 6, "train.save_interval": 2, "train.keep_last": 1})
    try:
        wait_for_checkpoint(run, "step_00000002", proc)
        filler = fill(disk, leave=96 * 1024)  # room for metrics lines, not for a checkpoint
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "checkpoints/step_00000004: checkpoint not written" in errors[0] and "out of space (about" in errors[0]
    assert f"the previous checkpoint {run}/checkpoints/step_00000002 is kept" in errors[0]
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert checkpoint.latest_tag(run) == "step_00000002" and checkpoint.damage(run, "step_00000002") == []
    filler.unlink()
    rerun = lmforge(*train_args(ws, run, "train.max_steps=6", "train.save_interval=2", "train.keep_last=1",
                                "run.log_interval=1", "train.eval_interval=0"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and "at step 2" in rerun.stdout and checkpoint.latest_tag(run) == "step_00000006"


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(ws, small_disk):
    disk = small_disk("128k")
    before = snapshot(ws)
    error = assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", disk / "hf"), f"--output {disk / 'hf'}: out of space (about")
    assert "the partial export was removed" in error
    assert list(disk.iterdir()) == [] and snapshot(ws) == before


@pytest.mark.slow
def test_shards_on_a_full_disk_keep_the_complete_shards_and_the_rerun_finishes(small_disk, tiny_corpus_shards):
    disk = small_disk("200k")  # ~600 kB of shards
    files = [str(p) for p in tiny_corpus_shards.files]
    args = ["prep", "shards", "--input", *files, "--tokenizer", tiny_corpus_shards.tokenizer_dir, "--output", disk / "shards",
            "--workers", "1", "--shard-tokens", "20000", "--valid-fraction", "0"]
    error = assert_refused(lmforge(*args), f"--output {disk / 'shards'}: out of space (about")
    assert "the shard being written was removed" in error
    kept = sorted(p.name for p in (disk / "shards").glob("*.bin"))
    assert kept and all(p.stat().st_size > 0 for p in (disk / "shards").glob("*.bin"))
    assert not list((disk / "shards").glob(".*tmp*"))
    subprocess.run(["mount", "-o", "remount,size=8M", str(disk)], check=True)
    again = lmforge(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    verify = lmforge("prep", "verify", disk / "shards")
    assert verify.returncode == 0 and "every checksum matches" in verify.stdout


@pytest.mark.slow
def test_a_tokenizer_on_a_full_disk_is_one_line_and_leaves_no_folder(small_disk, tiny_corpus_shards):
    disk = small_disk("1M")
    filler = fill(disk, leave=6000)  # room for the folder's marker, not for a 400-piece tokenizer.model (~7 kB)
    error = assert_refused(lmforge("prep", "tokenizer", "--input", *tiny_corpus_shards.files[:3], "--output", disk / "tok",
                                   "--vocab-size", "400"), "tokenizer.model: out of space (about")
    assert "free on the filesystem" in error and list(disk.iterdir()) == [filler]


# ---- resume records -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [b'{"format_version": 1, "tag": "step_0000', b"\xff\xfe\x00garbage", b"[1, 2, 3]",
                                    b'{"step": 4, "files": "not a table"}'], ids=["torn", "binary", "a-list", "files-not-a-table"])
def test_a_damaged_complete_record_is_one_line_and_fallback_uses_the_previous(tmp_path, damage, capsys):
    from pretrain import resume

    for step in (2, 4):
        checkpoint.save(FileWritingEngine(1000), tmp_path, step, {"step": step}, keep_last=2)
    record = tmp_path / "checkpoints" / "step_00000004" / "COMPLETE"
    record.write_bytes(damage)
    with pytest.raises(LmforgeError, match=f"{record}: not a checkpoint record .*--resume-fallback .* step_00000002"):
        resume.choose_tag(tmp_path, fallback=False)
    assert record.read_bytes() == damage  # refused: nothing changed
    assert resume.choose_tag(tmp_path, fallback=True) == "step_00000002"
    assert "falling back to" in capsys.readouterr().out
    assert not record.exists() and (record.parent / "DAMAGED").read_bytes().startswith(damage)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"

@pytest.mark.slow
def test_the_checkpoint_record_holds_what_a_resume_must_match(finished_tiny_run):
    record = checkpoint.read_record(finished_tiny_run / "run" / "checkpoints" / "step_00000002")
    manifest = json.loads((finished_tiny_run / "shards" / "manifest.json").read_text())
    assert record["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert record["data"] == {"path": [os.path.realpath(finished_tiny_run / "shards")], "weights": None,
                              "content": [manifest["corpus"]["sha256"]]}
    assert record["model"]["d_model"] == 32 and record["world_size"] == 1 and record["data_parallel_size"] == 1
    assert record["zero_stage"] == 0 and record["pipeline_stages"] == 1  # the tiny preset's ZeRO-1, built as ZeRO-0 on one rank


@pytest.mark.slow
def test_resuming_on_shards_of_another_tokenizer_of_the_same_size_is_refused(ws, tiny_corpus_shards):
    files = [str(p) for p in tiny_corpus_shards.files]
    made = lmforge("prep", "tokenizer", "--input", *files[::-1][:20], "--output", ws / "tok2", "--vocab-size",
                   str(tiny_corpus_shards.vocab_size), "--seed", "7")
    assert made.returncode == 0, made.stderr[-2000:]
    made = lmforge("prep", "shards", "--input", *files, "--tokenizer", ws / "tok2", "--output", ws / "shards2", "--workers", "1",
                   "--valid-fraction", "0.15", "--seed", "3", "--shard-tokens", "100000")
    assert made.returncode == 0, made.stderr[-2000:]
    before = snapshot(ws)
    args = train_args(ws, ws / "run", "train.max_steps=4")
    args[args.index(f"data.path=[{ws / 'shards'}]")] = f"data.path=[{ws / 'shards2'}]"
    assert_refused(lmforge(*args), f"{ws}/run/checkpoints/step_00000002: trained on shards of another tokenizer (fingerprint")
    both = train_args(ws, ws / "run", "train.max_steps=4")
    both[both.index(f"data.path=[{ws / 'shards'}]")] = f"data.path=[{ws / 'shards'}, {ws / 'shards'}]"
    assert_refused(lmforge(*both), "trained on other shards (data.path =")
    weighted = train_args(ws, ws / "run", "train.max_steps=4", "data.weights=[2.0]")
    assert_refused(lmforge(*weighted), "trained with data.weights = None, the config says [2.0]")
    assert snapshot(ws) == before


@pytest.mark.slow
def test_a_moved_copy_of_the_same_shards_resumes(ws):
    shutil.move(ws / "shards", ws / "moved")
    args = train_args(ws, ws / "run", "train.max_steps=3")
    args[args.index(f"data.path=[{ws / 'shards'}]")] = f"data.path=[{ws / 'moved'}]"
    result = lmforge(*args)
    assert result.returncode == 0 and "at step 2" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_a_finished_run_says_nothing_to_do_and_changes_nothing(ws):
    before = snapshot(ws)
    result = lmforge(*train_args(ws, ws / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"nothing to do: {ws / 'run'} already at step 2 ≥ train.max_steps = 2" in result.stdout
    shorter = lmforge(*train_args(ws, ws / "run", "train.max_steps=1"))
    assert shorter.returncode == 0 and "already at step 2 ≥ train.max_steps = 1" in shorter.stdout
    assert snapshot(ws) == before


@pytest.mark.slow
def test_a_damaged_complete_record_is_refused_or_falls_back(ws):
    more = lmforge(*train_args(ws, ws / "run", "train.max_steps=4", "train.save_interval=2", "train.keep_last=2"))
    assert more.returncode == 0, more.stderr[-3000:]
    record = ws / "run" / "checkpoints" / "step_00000004" / "COMPLETE"
    record.write_bytes(record.read_bytes()[:57])  # torn JSON
    before = snapshot(ws)
    error = assert_refused(lmforge(*train_args(ws, ws / "run", "train.max_steps=6")),
                           f"{record}: not a checkpoint record (expected JSON)")
    assert "--resume-fallback" in error and "step_00000002" in error
    assert snapshot(ws) == before
    fallback = lmforge(*train_args(ws, ws / "run", "train.max_steps=6", "train.save_interval=2"), "--resume-fallback")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "falling back to" in fallback.stdout and "resumed from" in fallback.stdout and "at step 2" in fallback.stdout
    assert checkpoint.latest_tag(ws / "run") == "step_00000006"
