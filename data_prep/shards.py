"""Text to Megatron shards: tokenize in a process pool, split train/valid, write DIR/manifest.json.

Every document gets an EOD token appended and goes to `valid` when a hash of (seed, its text) falls
under `valid_fraction`, so the split of a document never depends on its position. Each split is a
series of shards (`train_00000.bin/.idx`, ...) closed once they hold `shard_tokens` tokens.

Progress is recorded in DIR/manifest.partial.json after each finished shard; a rerun with the same
inputs, tokenizer and options keeps those shards and tokenizes only what follows them, so its result
is byte-identical to an uninterrupted run. DIR/manifest.json is written last, when all is done.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from data_prep.corpus import Corpus, CorpusSpec, corpus_inputs, list_files
from data_prep.indexed_dataset import IndexedDatasetWriter, bin_path, idx_path, token_dtype
from lmforge.files import atomic_write_bytes, atomic_write_json, clean_temp_files, output_directory, sha256_file
from data_prep.manifest import (
    FORMAT_VERSION, MANIFEST_FILE, SPLITS, Manifest, Shard, Split, TokenizerRef, manifest_from_json, manifest_to_json,
)
from data_prep.tokenizer import Tokenizer
from lmforge import ownership
from lmforge.errors import KeptOutputError, LmforgeError
from lmforge.out_of_space import describe as describe_space, is_out_of_space

PARTIAL_FILE = "manifest.partial.json"
TOKENIZER_COPY = "tokenizer.model"


@dataclass(frozen=True)
class ShardOptions:
    """How documents become shards (all of these change the output, except `workers`)."""

    valid_fraction: float = 0.01
    """Expected share of documents in the valid split, chosen by content hash."""
    seed: int = 0
    """Seed of the train/valid split hash."""
    shard_tokens: int = 100_000_000
    """A shard is closed once it holds at least this many tokens (documents are never cut)."""
    workers: int = os.cpu_count() or 1
    """Tokenizer processes; 1 tokenizes in this process."""
    batch_bytes: int = 1 << 20
    """Text bytes sent to a worker per task."""


@dataclass(frozen=True)
class ShardSummary:
    """What a `build_shards` run produced."""

    directory: Path
    documents: int
    tokens: int
    bytes: int
    shards: int
    reused_shards: int
    skipped_documents: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


def is_valid_document(data: bytes, seed: int, valid_fraction: float) -> bool:
    """True when the document with UTF-8 `data` belongs to the valid split."""
    digest = hashlib.blake2b(data, digest_size=8, salt=seed.to_bytes(16, "little", signed=True)[:16]).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64


# ---- worker side: one Tokenizer per process, loaded once by the pool initializer.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_bytes)


PIECE_CHARS = 1 << 20
"""A document longer than this is tokenized in pieces of about this many characters, cut after a newline."""


def document_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, each cut just before a run of spaces.

    sentencepiece starts a new word at a space that follows a non-space, and BPE never merges
    across words, so the pieces' tokens are exactly the whole text's. A piece with no such space
    in its second half (one giant word) is cut at `size` characters; only there can tokens differ."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            low = start + size // 2
            cut = text.rfind(" ", low, end)
            while cut > low and text[cut - 1] == " ":
                cut -= 1
            if cut > low:
                end = cut
        yield text[start:end]
        start = end


def _encode_long(text: str, tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """Tokens of one huge document and its EOD, piece by piece: a few bytes per token (the pieces' arrays
    and their concatenation), not the ~36 of a Python list of ints."""
    pieces = [np.asarray(tokenizer.encode(piece), dtype=dtype) for piece in document_pieces(text)]
    return np.concatenate([*pieces, np.array([tokenizer.eod_id], dtype=dtype)])


def _encode_documents(texts: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts`, each followed by EOD, concatenated; and each document's length."""
    tokenizer = tokenizer or _worker_tokenizer
    assert tokenizer is not None
    dtype = token_dtype(tokenizer.vocab_size)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    short = [t for t in texts if len(t) <= PIECE_CHARS]
    encoded = iter(tokenizer.encode_batch(short))
    for number, text in enumerate(texts):
        if len(text) <= PIECE_CHARS:
            parts += [np.asarray(next(encoded), dtype=dtype), eod]
        else:
            parts.append(_encode_long(text, tokenizer, dtype))
        lengths[number] = len(parts[-2]) + 1 if len(text) <= PIECE_CHARS else len(parts[-1])
    if len(parts) == 1:  # one huge document: no copy
        return parts[0], lengths
    return (np.concatenate(parts) if parts else np.empty(0, dtype=dtype)), lengths


# ---- main side
class _SplitWriter:
    """The open shard of one split and the shards it has finished."""

    def __init__(self, directory: Path, split: Split, dtype: np.dtype, done: list[Shard]) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shards = list(done)
        self.reused = len(done)
        self._writer: IndexedDatasetWriter | None = None
        self._bytes = 0

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        if self._writer is None:
            prefix = self.directory / f"{self.split}_{len(self.shards):05d}"
            self._writer = IndexedDatasetWriter(prefix, self.dtype)
            self._bytes = 0
        self._writer.add_document(tokens)
        self._bytes += text_bytes

    @property
    def open_tokens(self) -> int:
        return self._writer.tokens if self._writer else 0

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        bin_sha, idx_sha = writer.finish()
        self.shards.append(Shard(
            path=writer.prefix.name, split=self.split, documents=writer.documents, tokens=writer.tokens,
            bytes=self._bytes, bin_sha256=bin_sha, idx_sha256=idx_sha,
            bin_size=bin_path(writer.prefix).stat().st_size, idx_size=idx_path(writer.prefix).stat().st_size,
        ))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def _run_key(corpus: Corpus, tokenizer: Tokenizer, options: ShardOptions) -> str:
    spec = corpus.spec
    key = {
        "inputs": [n if n == "stdlib" else str(Path(n).resolve()) for n in spec.inputs],
        "spec": asdict(spec) | {"inputs": None}, "sources": corpus.source_key(), "tokenizer": tokenizer.fingerprint,
        "valid_fraction": options.valid_fraction, "seed": options.seed, "shard_tokens": options.shard_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _other_run(directory: Path, what: str) -> LmforgeError:
    return LmforgeError(
        f"{directory}: already holds shards of {what}; nothing was changed: choose another --output or delete it"
    )


def _check_output_dir(directory: Path, tokenizer: Tokenizer, run_key: str) -> dict[str, Any] | None:
    """Refuses a directory holding another tokenizer's or run's shards; returns previous state of this run."""
    copy = directory / TOKENIZER_COPY
    has_shards = any(directory.glob("*.idx")) or any(directory.glob("*.bin")) or (directory / MANIFEST_FILE).exists()
    if copy.is_file() and sha256_file(copy) != tokenizer.fingerprint:
        raise _other_run(directory, f"another tokenizer (its {TOKENIZER_COPY} differs from the one given)")
    if has_shards and not copy.is_file():
        raise _other_run(directory, f"unknown origin (no {TOKENIZER_COPY} beside them)")
    for name in (MANIFEST_FILE, PARTIAL_FILE):
        path = directory / name
        if path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise LmforgeError(f"{path}: not valid JSON; delete {directory} and rerun `lmforge prep shards`") from None
            if state.get("run_key") == run_key:
                return state | {"complete": name == MANIFEST_FILE}
            if name == MANIFEST_FILE:
                raise _other_run(directory, "other inputs or options")
            _discard_unfinished_run(directory, state)
    return None


def _discard_unfinished_run(directory: Path, state: dict[str, Any]) -> None:
    """Removes the shards of an unfinished run made with other inputs or options (never complete)."""
    for shard in state.get("shards", []):
        prefix = directory / shard["path"]
        bin_path(prefix).unlink(missing_ok=True)
        idx_path(prefix).unlink(missing_ok=True)
    (directory / PARTIAL_FILE).unlink()


def _intact_prefix(directory: Path, shards: list[Shard]) -> list[Shard]:
    """The recorded shards, up to the first whose files are missing or of the wrong size."""
    kept = []
    for shard in shards:
        prefix = directory / shard.path
        sizes = [p.stat().st_size if p.is_file() else -1 for p in (bin_path(prefix), idx_path(prefix))]
        if sizes != [shard.bin_size, shard.idx_size]:
            break
        kept.append(shard)
    return kept


def _batches(corpus: Corpus, options: ShardOptions, resume: dict[str, int], stats: dict[str, Any]) -> Iterator[list[tuple[int, Split, int, str]]]:
    """Batches of (document number, split, text bytes, text) still to tokenize; hashes every document into `stats`."""
    batch: list[tuple[int, Split, int, str]] = []
    size = 0
    for number, text in enumerate(corpus.documents()):
        data = text.encode("utf-8")
        stats["digest"].update(len(data).to_bytes(8, "little") + data)
        stats["documents"] += 1
        stats["bytes"] += len(data)
        split: Split = "valid" if is_valid_document(data, options.seed, options.valid_fraction) else "train"
        if number < resume[split]:
            continue
        batch.append((number, split, len(data), text))
        size += len(data)
        del data  # a huge document's bytes are not kept while its batch is tokenized
        if size >= options.batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _threads_unsafe_to_fork() -> list[threading.Thread]:
    """Threads besides this one, except tqdm's monitor (workers never touch tqdm or its lock)."""
    from tqdm import TMonitor

    return [t for t in threading.enumerate() if t is not threading.current_thread() and not isinstance(t, TMonitor)]


@contextlib.contextmanager
def _worker_pool(tokenizer: Tokenizer, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of `workers` tokenizer processes (None for 1: tokenize in this process).

    fork starts in milliseconds where spawn takes ~0.3 s a worker to import numpy and
    sentencepiece; it is used only while this process runs no other Python thread (a thread
    holding a lock at fork time would leave that lock held forever in the child).
    """
    if workers <= 1:
        yield None
        return
    fork_safe = "fork" in multiprocessing.get_all_start_methods() and not _threads_unsafe_to_fork()
    context = multiprocessing.get_context("fork" if fork_safe else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes(),)) as pool:
        yield pool


def _encoded(batches: Iterator[list], tokenizer: Tokenizer, pool: multiprocessing.pool.Pool | None,
             in_flight: int) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    """(batch, tokens, lengths) in corpus order, with at most `in_flight` batches being tokenized."""
    if pool is None:
        for batch in batches:
            yield (batch, *_encode_documents([item[-1] for item in batch], tokenizer))
        return
    # Pool.imap would read the whole corpus ahead into its task queue; a bounded deque of
    # ordered async results keeps the same order with memory flat in corpus size.
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(_encode_documents, ([item[-1] for item in batch],))))
        if len(pending) >= in_flight:
            done, result = pending.popleft()
            yield (done, *result.get())
    while pending:
        done, result = pending.popleft()
        yield (done, *result.get())


def _manifest(directory: Path, tokenizer: Tokenizer, spec: CorpusSpec, options: ShardOptions,
              shards: list[Shard], corpus: dict[str, Any]) -> Manifest:
    return Manifest(
        directory=directory,
        format_version=FORMAT_VERSION,
        tokenizer=TokenizerRef(
            path=tokenizer.model_path.resolve() if tokenizer.model_path else Path(), fingerprint=tokenizer.fingerprint,
            vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id,
        ),
        shards=tuple(sorted(shards, key=lambda s: (SPLITS.index(s.split), s.path))),
        inputs=spec.inputs,
        options={
            "valid_fraction": options.valid_fraction, "seed": options.seed, "shard_tokens": options.shard_tokens,
            "include": list(spec.include), "text_field": spec.text_field, "skip_bad_documents": spec.skip_bad_documents,
        },
        corpus=corpus,
    )


def _summary(manifest: Manifest, reused: int, started: float) -> ShardSummary:
    return ShardSummary(
        directory=manifest.directory, documents=sum(s.documents for s in manifest.shards),
        tokens=sum(s.tokens for s in manifest.shards), bytes=sum(s.bytes for s in manifest.shards),
        shards=len(manifest.shards), reused_shards=reused,
        skipped_documents=int(manifest.corpus.get("skipped_documents", 0)), seconds=time.perf_counter() - started,
    )


def _resume_points(directory: Path, state: dict[str, Any] | None) -> tuple[dict[str, list[Shard]], dict[str, int]]:
    """Per split: the recorded shards still intact, and the document number to continue from."""
    previous = list(manifest_from_json(directory, state).shards) if state else []
    next_document = state.get("next_document", {}) if state else {}
    done: dict[str, list[Shard]] = {}
    resume: dict[str, int] = {}
    for split in SPLITS:
        done[split] = _intact_prefix(directory, [s for s in previous if s.split == split])
        resume[split] = next_document[done[split][-1].path] if done[split] else 0
    return done, resume


def build_shards(spec: CorpusSpec, tokenizer_path: Path, output_dir: Path, options: ShardOptions, progress: bool = True) -> ShardSummary:
    """Tokenizes the corpus of `spec` into shards in `output_dir`; returns what was done."""
    started = time.perf_counter()
    tokenizer = Tokenizer.load(tokenizer_path)
    corpus = Corpus(spec)
    ownership.check_output(Path(output_dir), "shards", "prep shards", "--output",
                           {**corpus_inputs(spec), "--tokenizer": Path(tokenizer_path)})
    with output_directory(Path(output_dir)) as directory:  # a bad input found while streaming leaves no new folder
        return _build_shards_in(directory, corpus, tokenizer, spec, options, progress, started)


def _build_shards_in(directory: Path, corpus: Corpus, tokenizer: Tokenizer, spec: CorpusSpec, options: ShardOptions,
                     progress: bool, started: float) -> ShardSummary:
    run_key = _run_key(corpus, tokenizer, options)
    state = _check_output_dir(directory, tokenizer, run_key)
    if state and state["complete"]:
        manifest = manifest_from_json(directory, state)
        if len(_intact_prefix(directory, list(manifest.shards))) == len(manifest.shards):
            return _summary(manifest, len(manifest.shards), started)
        state = None
    clean_temp_files(directory)
    ownership.claim(directory, "shards", "prep shards")
    (directory / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the directory is incomplete
    if not (directory / TOKENIZER_COPY).is_file():
        atomic_write_bytes(directory / TOKENIZER_COPY, tokenizer.model_bytes())

    done, resume = _resume_points(directory, state)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _SplitWriter(directory, split, dtype, done[split]) for split in SPLITS}
    next_document = dict(state.get("next_document", {})) if state else {}
    stats: dict[str, Any] = {"digest": hashlib.sha256(), "documents": 0, "bytes": 0}
    try:
        with _worker_pool(tokenizer, options.workers) as pool:  # before tqdm starts its monitor thread
            batches = _encoded(_batches(corpus, options, resume, stats), tokenizer, pool, 2 * options.workers)
            _write_batches(batches, writers, options, started, progress,
                           lambda: _save_partial(directory, tokenizer, spec, options, writers, next_document, run_key),
                           next_document)
    except OSError as err:  # the open shard's temp files are already removed (_SplitWriter.abort)
        if not is_out_of_space(err):
            raise
        kept = sum(len(w.shards) for w in writers.values())
        needed = sum(p.stat().st_size for p in list_files(spec) if p.is_file()) * dtype.itemsize // 4
        raise KeptOutputError(f"--output {directory}: {describe_space(directory, needed)}; the shard being written was "
                           f"removed, the {kept} complete shard(s) are kept: free space and rerun the same command "
                           "to continue") from None
    corpus_info = {"documents": stats["documents"], "bytes": stats["bytes"], "sha256": stats["digest"].hexdigest(),
                   "skipped_documents": corpus.skipped_documents}
    shards = [s for split in SPLITS for s in writers[split].shards]
    manifest = _manifest(directory, tokenizer, spec, options, shards, corpus_info)
    atomic_write_json(directory / MANIFEST_FILE, manifest_to_json(manifest, {"run_key": run_key}))
    (directory / PARTIAL_FILE).unlink(missing_ok=True)
    return _summary(manifest, sum(w.reused for w in writers.values()), started)


def _write_batches(batches: Iterator[tuple[list, np.ndarray, np.ndarray]], writers: dict[str, _SplitWriter],
                   options: ShardOptions, started: float, progress: bool, save_partial: Callable[[], None],
                   next_document: dict[str, int]) -> None:
    """Appends each tokenized document to its split; closes full shards and records progress."""
    from tqdm import tqdm

    bar = tqdm(desc="shards", unit=" docs", disable=not progress)
    tokens_done = 0
    try:
        for batch, tokens, lengths in batches:
            end = 0
            for (number, split, text_bytes, _), length in zip(batch, lengths):
                writers[split].add(tokens[end : end + length], text_bytes)
                end += length
                if writers[split].open_tokens >= options.shard_tokens:
                    writers[split].close()
                    next_document[writers[split].shards[-1].path] = number + 1
                    save_partial()
            tokens_done += end
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{tokens_done / (time.perf_counter() - started):,.0f}")
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()


def _save_partial(directory: Path, tokenizer: Tokenizer, spec: CorpusSpec, options: ShardOptions,
                  writers: dict[str, _SplitWriter], next_document: dict[str, int], run_key: str) -> None:
    shards = [s for split in SPLITS for s in writers[split].shards]
    manifest = _manifest(directory, tokenizer, spec, options, shards, {})
    extra = {"run_key": run_key, "next_document": {s.path: next_document[s.path] for s in shards}}
    atomic_write_json(directory / PARTIAL_FILE, manifest_to_json(manifest, extra))
