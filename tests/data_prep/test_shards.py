import hashlib
import json
import shutil

import numpy as np
import pytest

import data_prep.shards as shards_module
from data_prep.corpus import CorpusSpec
from data_prep.indexed_dataset import IndexedDataset
from data_prep.manifest import load_manifest, verify_manifest
from data_prep.shards import ShardOptions, build_shards, is_valid_document
from data_prep.tokenizer import Tokenizer, TokenizerOptions, train_tokenizer
from lmforge.errors import LmforgeError


def spec_of(files) -> CorpusSpec:
    return CorpusSpec(inputs=tuple(str(p) for p in files))


def snapshot(directory) -> dict[str, bytes]:
    """Every file's bytes, but the owner marker's (it records when the folder was made)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lmforge-owner.json"}


def test_shards_hold_each_documents_tokens_plus_eod_in_corpus_order(tiny_corpus_shards):
    tok = Tokenizer.load(tiny_corpus_shards.tokenizer_dir)
    manifest = load_manifest(tiny_corpus_shards.shard_dir)
    for split in ("train", "valid"):
        expected = [
            tok.encode(p.read_text(encoding="utf-8")) + [tok.eod_id]
            for p in tiny_corpus_shards.files
            if (split == "valid") == is_valid_document(p.read_bytes(), 3, 0.15)
        ]
        found = [
            IndexedDataset(manifest.directory / s.path)[i].tolist()
            for s in manifest.split_shards(split)
            for i in range(s.documents)
        ]
        assert found == expected
        assert manifest.tokens(split) == sum(map(len, expected))


def test_manifest_lists_every_shard_with_counts_and_checksums(tiny_corpus_shards):
    directory = tiny_corpus_shards.shard_dir
    manifest = load_manifest(directory)
    assert [s.path for s in manifest.shards][:2] == ["train_00000", "train_00001"]
    assert {s.split for s in manifest.shards} == {"train", "valid"}
    assert sum(s.documents for s in manifest.shards) == len(tiny_corpus_shards.files)
    assert sum(s.bytes for s in manifest.shards) == sum(len(p.read_bytes()) for p in tiny_corpus_shards.files)
    for shard in manifest.shards:
        data = (directory / f"{shard.path}.bin").read_bytes()
        assert shard.bin_sha256 == hashlib.sha256(data).hexdigest()
        assert shard.idx_sha256 == hashlib.sha256((directory / f"{shard.path}.idx").read_bytes()).hexdigest()
        assert shard.tokens == len(data) // 2
    assert manifest.split_shards("train")[0].tokens >= 100_000  # closed at --shard-tokens
    model = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    assert manifest.tokenizer.path == model.resolve() and manifest.tokenizer.path.is_absolute()
    assert (directory / "tokenizer.model").read_bytes() == model.read_bytes()
    assert manifest.tokenizer.fingerprint == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (manifest.tokenizer.vocab_size, manifest.tokenizer.eod_id, manifest.tokenizer.pad_id) == (512, 3, 0)
    raw = json.loads((directory / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["options"]["valid_fraction"] == 0.15
    assert verify_manifest(directory) == manifest


def test_split_depends_on_content_and_seed_not_position(tmp_path, tiny_corpus_shards):
    files = list(tiny_corpus_shards.files)
    model = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    options = ShardOptions(valid_fraction=0.3, workers=1)
    build_shards(spec_of(files), model, tmp_path / "a", options, progress=False)
    build_shards(spec_of(files[::-1]), model, tmp_path / "b", options, progress=False)

    def valid_documents(directory):
        m = load_manifest(directory)
        return sorted(IndexedDataset(directory / s.path)[i].tobytes() for s in m.split_shards("valid") for i in range(s.documents))

    assert valid_documents(tmp_path / "a") == valid_documents(tmp_path / "b")
    assert 3 <= len(valid_documents(tmp_path / "a")) <= 25
    assert [is_valid_document(b"x" * i, 0, 0.3) for i in range(20)] != [is_valid_document(b"x" * i, 1, 0.3) for i in range(20)]


def test_rerun_with_same_inputs_reuses_shards_and_changes_nothing(tmp_path, tiny_corpus_shards):
    directory = tmp_path / "out"
    shutil.copytree(tiny_corpus_shards.shard_dir, directory)
    before = snapshot(directory)
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    options = ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=100_000, workers=1)
    summary = build_shards(spec_of(tiny_corpus_shards.files), tiny_corpus_shards.tokenizer_dir, directory, options, progress=False)
    assert summary.reused_shards == summary.shards == len(load_manifest(directory).shards)
    assert snapshot(directory) == before
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == mtimes


def test_interrupted_run_leaves_no_manifest_and_rerun_is_byte_identical(tmp_path, tiny_corpus_shards, monkeypatch):
    model = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    spec, options = spec_of(tiny_corpus_shards.files), ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=30_000, workers=1)
    build_shards(spec, model, tmp_path / "clean", options, progress=False)

    saves = []
    real_save = shards_module._save_partial

    def save_then_die(*args):
        real_save(*args)
        saves.append(1)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_shards(spec, model, tmp_path / "resumed", options, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert not list((tmp_path / "resumed").glob(".*tmp*"))
    with pytest.raises(LmforgeError, match=r"manifest not found.*the run did not finish; rerun it"):
        load_manifest(tmp_path / "resumed")

    summary = build_shards(spec, model, tmp_path / "resumed", options, progress=False)
    assert summary.reused_shards == 3
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "clean")


def test_directory_of_another_tokenizer_is_refused_untouched(tmp_path, tiny_corpus_shards, stdlib_subset):
    directory = tmp_path / "out"
    shutil.copytree(tiny_corpus_shards.shard_dir, directory)
    before = snapshot(directory)
    other = train_tokenizer(spec_of(stdlib_subset(3)), TokenizerOptions(vocab_size=400), tmp_path / "tok", progress=False)
    with pytest.raises(LmforgeError, match=r"out: already holds shards of another tokenizer"):
        build_shards(spec_of(tiny_corpus_shards.files), other, directory, ShardOptions(workers=1), progress=False)
    assert snapshot(directory) == before


def test_directory_of_other_inputs_is_refused_untouched(tmp_path, tiny_corpus_shards):
    directory = tmp_path / "out"
    shutil.copytree(tiny_corpus_shards.shard_dir, directory)
    before = snapshot(directory)
    with pytest.raises(LmforgeError, match=r"already holds shards of other inputs or options"):
        build_shards(spec_of(tiny_corpus_shards.files[:5]), tiny_corpus_shards.tokenizer_dir, directory,
                     ShardOptions(workers=1), progress=False)
    assert snapshot(directory) == before


def test_verify_names_the_first_corrupted_file(tmp_path, tiny_corpus_shards):
    directory = tmp_path / "out"
    shutil.copytree(tiny_corpus_shards.shard_dir, directory)
    verify_manifest(directory)
    path = directory / "train_00001.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match=r"train_00001.bin: sha256 .* does not match the manifest's"):
        verify_manifest(directory)
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(LmforgeError, match=r"train_00001.bin: \d+ bytes, manifest says \d+"):
        verify_manifest(directory)


@pytest.mark.slow
def test_worker_pool_output_equals_single_process_output(tmp_path, tiny_corpus_shards):
    model = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    spec = spec_of(tiny_corpus_shards.files)
    single = ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=50_000, workers=1)
    pooled = ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=50_000, workers=2, batch_bytes=20_000)
    build_shards(spec, model, tmp_path / "one", single, progress=False)
    build_shards(spec, model, tmp_path / "two", pooled, progress=False)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    assert np.array_equal(IndexedDataset(tmp_path / "two" / "valid_00000")[0], IndexedDataset(tmp_path / "one" / "valid_00000")[0])



def test_unfinished_run_with_other_options_is_replaced_by_the_new_run(tmp_path, tiny_corpus_shards, monkeypatch):
    model = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    spec = spec_of(tiny_corpus_shards.files)
    real_save = shards_module._save_partial

    def save_then_die(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_shards(spec, model, tmp_path / "out", ShardOptions(shard_tokens=20_000, workers=1), progress=False)
    monkeypatch.undo()
    assert (tmp_path / "out" / "manifest.partial.json").exists()
    options = ShardOptions(valid_fraction=0.15, seed=3, shard_tokens=100_000, workers=1)
    build_shards(spec, model, tmp_path / "out", options, progress=False)
    assert snapshot(tmp_path / "out") == snapshot(tiny_corpus_shards.shard_dir)


def test_a_huge_document_is_tokenized_in_pieces_with_exactly_the_whole_documents_tokens(tiny_corpus_shards):
    import random

    from data_prep.shards import _encode_documents, document_pieces

    tokenizer = Tokenizer.load(tiny_corpus_shards.tokenizer_dir / "tokenizer.model")
    rng = random.Random(1)
    words = ["def", "  return", "self.x", "\n    import", "rängé", "x  ", "(", ")\n", "\tfor", "12", "  ", " ", "\n\n"]
    text = "".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(20000))
    for size in (777, 5000):
        pieces = list(document_pieces(text, size))
        assert "".join(pieces) == text and len(pieces) > 3
        assert [i for p in pieces for i in tokenizer.encode(p)] == tokenizer.encode(text)
    shards_module.PIECE_CHARS, saved = 1000, shards_module.PIECE_CHARS
    try:
        tokens, lengths = _encode_documents([text, "x = 1"], tokenizer)
    finally:
        shards_module.PIECE_CHARS = saved
    assert tokens.tolist() == tokenizer.encode(text) + [tokenizer.eod_id] + tokenizer.encode("x = 1") + [tokenizer.eod_id]
    assert lengths.tolist() == [len(tokenizer.encode(text)) + 1, len(tokenizer.encode("x = 1")) + 1]


@pytest.mark.slow
def test_a_one_line_document_is_sharded_in_memory_a_few_times_its_size(tiny_corpus_shards, tmp_path):
    """A 24 MB one-line document: peak RSS of `prep shards` stays under 150 MB + 6 x its size (it was ~50x)."""
    import random
    import subprocess
    import sys

    from tests.pretrain.training_runs import REPO, run_env

    rng = random.Random(0)
    words = ["def", "return", "self", "value", "x", "=", "(", ")", "for", "in", "0", "1", "total"]
    doc = tmp_path / "huge.txt"
    with open(doc, "w") as out:
        for _ in range(24):
            out.write(" ".join(rng.choice(words) for _ in range(200_000)) + " ")
    size = doc.stat().st_size
    command = [sys.executable, "-m", "lmforge.cli", "prep", "shards", "--input", str(doc), "--tokenizer",
               str(tiny_corpus_shards.tokenizer_dir), "--output", str(tmp_path / "out"), "--workers", "1"]
    # a fresh parent whose only child is `prep shards`: its children's maximum RSS is that run's peak
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", measure, *command], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split()[-1]) * 1024
    assert peak < 150e6 + 6 * size, (peak, size)
    manifest = load_manifest(tmp_path / "out")
    assert sum(s.documents for s in manifest.shards) == 1
