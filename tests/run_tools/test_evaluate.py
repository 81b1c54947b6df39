"""lmforge eval: loss, perplexity and bits per byte over a whole split, the same on 1 and 2 ranks."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.indexed_dataset import IndexedDataset
from lmforge.errors import run_cli
from run_tools import evaluate
from run_tools.run_config import load_checked_model
from tests.pretrain.training_runs import REPO, run_env, run_training

SEQ_LEN = 32  # train.seq_len of the run below, the default window


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_training(run_dir, tiny_corpus_shards.shard_dir, nproc=1, **{
        "deepspeed.config": "ds_configs/zero0.json", "train.max_steps": 20, "train.lr": 0.01, "train.warmup_steps": 2})
    return run_dir


def direct_loss(run_dir: Path, shard_dir: Path, max_windows: int | None = None) -> tuple[float, int]:
    """Mean nats per token over consecutive windows of the valid stream, via the model's own training loss."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    stream = np.concatenate([IndexedDataset(shard_dir / s["path"]).tokens for s in manifest["shards"] if s["split"] == "valid"])
    model, _, _ = load_checked_model(run_dir)
    starts = list(range(0, len(stream) - 1, SEQ_LEN))[:max_windows]
    windows = [stream[s : s + SEQ_LEN + 1].astype(np.int64) for s in starts]
    full = [w for w in windows if len(w) == SEQ_LEN + 1]
    groups = [np.stack(full[i : i + 256]) for i in range(0, len(full), 256)] + [w[None] for w in windows if len(w) <= SEQ_LEN]
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for group in groups:
            batch = torch.from_numpy(group)
            count = batch[:, 1:].numel()
            nats += float(model(batch[:, :-1], batch[:, 1:])) * count
            tokens += count
    return nats / tokens, tokens


def split_sizes(shard_dir: Path) -> tuple[int, int]:
    shards = [s for s in json.loads((shard_dir / "manifest.json").read_text())["shards"] if s["split"] == "valid"]
    return sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eval_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "lmforge.cli", "eval"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "run_tools.evaluate"]


def run_eval(run_dir: Path, nproc: int, *extra: str) -> tuple[str, dict]:
    output = run_dir.parent / f"eval_{run_dir.name}_{nproc}.json"
    result = subprocess.run(eval_command(nproc) + ["--checkpoint", str(run_dir), "--output", str(output), *extra], cwd=REPO,
                            env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads(output.read_text())


@pytest.mark.slow
def test_eval_of_the_whole_split_agrees_with_a_direct_computation_on_1_and_2_ranks(trained_run, tiny_corpus_shards):
    shard_dir = tiny_corpus_shards.shard_dir
    loss, tokens = direct_loss(trained_run, shard_dir)
    split_tokens, split_bytes = split_sizes(shard_dir)
    stdout, one = run_eval(trained_run, 1, "--batch-size", "64")
    for label in ("loss", "perplexity", "bits per byte", f"{one['tokens']:,} predicted"):
        assert label in stdout
    assert one["tokens"] == tokens == split_tokens - 1  # every token but the first is predicted once
    assert one["loss"] == pytest.approx(loss, rel=1e-6)
    assert one["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert one["bits_per_byte"] == pytest.approx(loss / math.log(2) * split_tokens / split_bytes, rel=1e-6)
    assert 2.0 < one["loss"] < math.log(512)  # trained a little: better than uniform
    _, two = run_eval(trained_run, 2, "--batch-size", "64")
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"] and two["sequences"] == one["sequences"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-9)


@pytest.mark.slow
def test_eval_with_batches_limit_covers_the_first_windows_of_every_rank(trained_run, tiny_corpus_shards):
    _, limited = run_eval(trained_run, 2, "--batches", "3", "--batch-size", "4")
    loss, tokens = direct_loss(trained_run, tiny_corpus_shards.shard_dir, max_windows=2 * 3 * 4)
    assert limited["sequences"] == 24 and limited["tokens"] == tokens == 24 * SEQ_LEN
    assert limited["loss"] == pytest.approx(loss, rel=1e-6)


def test_rank_batches_deal_every_window_once_round_robin():
    dealt = [list(evaluate.rank_batches(11, 2, r, 3, None)) for r in range(3)]
    assert dealt[0] == [range(0, 2), range(6, 8)]
    assert dealt[1] == [range(2, 4), range(8, 10)]
    assert dealt[2] == [range(4, 6), range(10, 11)]
    assert sorted(w for rank in dealt for batch in rank for w in batch) == list(range(11))
    assert list(evaluate.rank_batches(11, 2, 0, 3, max_batches=1)) == [range(0, 2)]


def test_short_last_window_is_padded_with_ignored_targets():
    inputs, targets = evaluate.batch_tensors([np.arange(5), np.arange(3)])
    assert inputs.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert targets.tolist() == [[1, 2, 3, 4], [1, 2, -100, -100]]


@pytest.mark.slow
def test_eval_input_errors_are_one_line(trained_run, tmp_path, capsys):
    def error(*argv: str, run_dir: Path = trained_run) -> str:
        code = run_cli(evaluate.main, ["--checkpoint", str(run_dir), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert "longer than the model's max_seq_len = 128" in error("--seq-len", "1000")
    assert "manifest not found" in error("--data", str(tmp_path))
    assert "no complete checkpoint for --step 3" in error("--step", "3")
    assert "not an lmforge run directory" in error(run_dir=tmp_path)


@pytest.mark.slow
def test_eval_of_a_read_only_archived_run_writes_nothing_into_it(trained_run, tmp_path):
    import hashlib
    import shutil
    import stat

    archive = tmp_path / "archived"
    shutil.copytree(trained_run, archive)
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in archive.rglob("*")}
    paths = [archive, *archive.rglob("*")]
    for path in paths:  # chmod -R a-w (root ignores it: the snapshot below is the real check)
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        result = subprocess.run(eval_command(1) + ["--checkpoint", str(archive), "--batches", "2"], cwd=REPO, env=run_env(),
                                capture_output=True, text=True, timeout=300)
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in archive.rglob("*")}
    assert after == before
