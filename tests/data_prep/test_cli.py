"""The `lmforge prep` command run for real: user errors are one line on stderr, exit 2, no traceback."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.indexed_dataset import IndexedDataset
from data_prep.manifest import load_manifest, verify_manifest

REPO = Path(__file__).resolve().parents[2]


def prep(*args, check_ok: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "prep", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    if check_ok:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, but the owner marker's (it records when the folder was made)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lmforge-owner.json"}


def test_missing_input(tmp_path):
    result = prep("tokenizer", "--input", tmp_path / "absent.txt", "--output", tmp_path / "tok")
    assert_one_line_error(result, "absent.txt: input not found")


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    result = prep("tokenizer", "--input", tmp_path / "corpus", "--output", tmp_path / "tok", "--vocab-size", "300")
    assert_one_line_error(result, "corpus: empty corpus")
    assert not (tmp_path / "tok" / "tokenizer.model").exists()


def test_undecodable_bytes_name_file_and_offset_or_are_skipped_and_counted(tmp_path, stdlib_subset):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in stdlib_subset(5):
        shutil.copy(path, corpus / path.name)
    (corpus / "zz_bad.py").write_bytes(b"x = 1\n# caf\xe9\n")
    result = prep("tokenizer", "--input", corpus, "--output", tmp_path / "tok", "--vocab-size", "400")
    assert_one_line_error(result, "zz_bad.py: byte 11: not valid UTF-8", "--skip-bad-documents")
    ok = prep("tokenizer", "--input", corpus, "--output", tmp_path / "tok", "--vocab-size", "400",
              "--skip-bad-documents", check_ok=True)
    assert [line.split() for line in ok.stdout.splitlines() if "skipped documents" in line] == [["skipped", "documents", "1"]]


def test_vocab_too_large_for_corpus(tmp_path):
    (tmp_path / "small.txt").write_text("a small corpus\n" * 10)
    result = prep("tokenizer", "--input", tmp_path / "small.txt", "--output", tmp_path / "tok", "--vocab-size", "50257")
    assert_one_line_error(result, "--vocab-size 50257 is too large for this corpus")


def test_output_holding_another_tokenizers_shards_is_left_untouched(tmp_path, tiny_corpus_shards, stdlib_subset):
    shutil.copytree(tiny_corpus_shards.shard_dir, tmp_path / "shards")
    before = snapshot(tmp_path / "shards")
    prep("tokenizer", "--input", *stdlib_subset(3), "--output", tmp_path / "other", "--vocab-size", "400", check_ok=True)
    result = prep("shards", "--input", *stdlib_subset(3), "--tokenizer", tmp_path / "other", "--output", tmp_path / "shards")
    assert_one_line_error(result, "shards: already holds shards of another tokenizer")
    assert snapshot(tmp_path / "shards") == before


def test_unwritable_output(tmp_path, tiny_corpus_shards):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = prep("shards", "--input", tiny_corpus_shards.files[0], "--tokenizer", tiny_corpus_shards.tokenizer_dir,
                  "--output", blocker / "shards")
    assert_one_line_error(result, "a_file/shards: output directory is not writable")
    result = prep("tokenizer", "--input", tiny_corpus_shards.files[0], "--output", blocker)
    assert_one_line_error(result, "a_file: exists and is not a directory")
    assert blocker.read_text() == "not a directory"


def test_missing_tokenizer(tmp_path):
    result = prep("shards", "--tokenizer", tmp_path / "nowhere", "--output", tmp_path / "out")
    assert_one_line_error(result, "nowhere: tokenizer model not found", "lmforge prep tokenizer")


def test_bad_option_values_are_reported_together(tmp_path):
    result = prep("shards", "--tokenizer", tmp_path, "--output", tmp_path, "--valid-fraction", "1.5", "--workers", "0")
    assert_one_line_error(result, "--valid-fraction 1.5: expected a number from 0 to 1", "--workers 0: expected an integer >= 1")


def test_unknown_option_is_one_line(tmp_path):
    assert_one_line_error(prep("verify", tmp_path, "--bogus"), "unrecognized arguments: --bogus")


def test_verify_reports_the_first_bad_file(tmp_path, tiny_corpus_shards):
    shutil.copytree(tiny_corpus_shards.shard_dir, tmp_path / "shards")
    ok = prep("verify", tmp_path / "shards", check_ok=True)
    assert ok.stdout.startswith("ok: ") and "every checksum matches" in ok.stdout
    (tmp_path / "shards" / "valid_00000.idx").write_bytes(b"garbage")
    assert_one_line_error(prep("verify", tmp_path / "shards"), "valid_00000.idx: 7 bytes, manifest says")
    (tmp_path / "shards" / "train_00000.bin").unlink()
    assert_one_line_error(prep("verify", tmp_path / "shards"), "train_00000.bin: missing")


def test_shards_summary_and_rerun_reports_up_to_date(tmp_path, tiny_corpus_shards):
    args = ["shards", "--input", *tiny_corpus_shards.files[:8], "--tokenizer", tiny_corpus_shards.tokenizer_dir,
            "--output", tmp_path / "s", "--workers", "1", "--valid-fraction", "0.2"]
    first = prep(*args, check_ok=True)
    assert "manifest.json written" in first.stdout and "bytes per token" in first.stdout
    assert first.stderr == ""
    second = prep(*args, check_ok=True)
    assert "manifest.json up to date" in second.stdout
    manifest = verify_manifest(tmp_path / "s")
    assert sum(s.documents for s in manifest.shards) == 8


@pytest.mark.slow
def test_killed_run_leaves_no_complete_looking_shard_and_rerun_finishes_identically(tmp_path, tiny_corpus_shards):
    args = ["shards", "--input", "stdlib", "--tokenizer", tiny_corpus_shards.tokenizer_dir, "--workers", "2",
            "--shard-tokens", "400000", "--valid-fraction", "0.05"]
    command = [sys.executable, "-m", "lmforge.cli", "prep", *map(str, args), "--output", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed" / "manifest.partial.json"
    deadline = time.monotonic() + 120
    while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its pool, mid-run
    process.wait()
    killed = tmp_path / "killed"
    assert partial.exists() and not (killed / "manifest.json").exists()
    for idx in killed.glob("*.idx"):  # every shard with an index is whole
        assert IndexedDataset(idx.with_suffix("")).num_tokens > 0
    with pytest.raises(Exception, match="the run did not finish"):
        load_manifest(killed)

    resumed = prep(*args, "--output", killed, check_ok=True)
    assert "reused shards" in resumed.stdout
    reused = int([line.split()[-1] for line in resumed.stdout.splitlines() if "reused shards" in line][0])
    assert reused >= 1
    assert not list(killed.glob(".*tmp*"))
    prep(*args, "--output", tmp_path / "clean", check_ok=True)
    assert snapshot(killed) == snapshot(tmp_path / "clean")


def test_tokenizer_rerun_with_same_inputs_is_not_retrained(tmp_path, stdlib_subset):
    args = ["tokenizer", "--input", *stdlib_subset(4), "--output", tmp_path / "tok", "--vocab-size", "400"]
    first = prep(*args, check_ok=True)
    assert "written" in first.stdout.splitlines()[0]
    model = tmp_path / "tok" / "tokenizer.model"
    stamp = model.stat().st_mtime_ns
    second = prep(*args, check_ok=True)
    assert "up to date" in second.stdout.splitlines()[0] and model.stat().st_mtime_ns == stamp
    third = prep(*args[:-1], "401", check_ok=True)
    assert "written" in third.stdout.splitlines()[0] and model.stat().st_mtime_ns != stamp
