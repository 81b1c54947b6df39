"""Train a sentencepiece BPE tokenizer from a streamed corpus, and load it back.

Round trip is exact: `decode(encode(text)) == text` for any text. sentencepiece already keeps
newlines, tabs, CR and leading spaces with the identity normalizer, no dummy prefix and byte
fallback; the one character it cannot keep is U+2581 ("▁", its own stand-in for a space, which
decodes to " "), so `encode` writes a literal U+2581 as its three UTF-8 byte pieces.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from data_prep.corpus import Corpus, CorpusSpec, corpus_inputs, describe_inputs
from lmforge import ownership
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_bytes, atomic_write_json, output_directory

MODEL_FILE = "tokenizer.model"
METADATA_FILE = "tokenizer.json"
FORMAT_VERSION = 1
PAD_ID, UNK_ID, BOS_ID, EOD_ID = 0, 1, 2, 3
_SPACE_SYMBOL = "\u2581"


@dataclass(frozen=True)
class TokenizerOptions:
    """How the BPE model is trained (everything else is fixed for an exact round trip)."""

    vocab_size: int = 32000
    """Number of pieces, specials, byte pieces and user symbols included."""
    user_symbols: tuple[str, ...] = ()
    """Strings always encoded as one piece where they appear in text (e.g. chat markers)."""
    control_symbols: tuple[str, ...] = ()
    """Pieces with an id but never produced from text; decode to ''."""
    character_coverage: float = 0.9995
    """Share of characters that get their own piece; the rest fall back to bytes."""
    input_sentence_size: int = 200_000
    """At most this many training chunks are sampled (shuffled) from the corpus; 0: all."""
    max_sentence_length: int = 1 << 16
    """Documents are fed to the trainer in chunks of at most this many bytes, split at newlines."""
    seed: int = 0
    """Seed of sentencepiece's sampling, so training is repeatable."""


SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")


def symbol_problems(options: TokenizerOptions) -> list[str]:
    """--user-symbol / --control-symbol values sentencepiece and the HF export cannot both honour, one line each.

    Refused: an empty symbol (no piece), one of the special pieces (sentencepiece would drop its
    special id: EOD -1), whitespace inside (sentencepiece matches symbols after turning spaces
    into U+2581, so it never matches, while the exported HF tokenizer does: their ids would
    differ), U+2581 itself, a byte piece like <0x41>, and a symbol given twice."""
    found = []
    seen: dict[str, str] = {}
    for flag, symbols in (("--user-symbol", options.user_symbols), ("--control-symbol", options.control_symbols)):
        for symbol in symbols:
            shown = f"{flag} {symbol!r}"
            if not symbol:
                found.append(f"{shown}: empty; a symbol needs at least one character")
            elif symbol in SPECIAL_PIECES:
                found.append(f"{shown}: already a special piece of every lmforge tokenizer ({', '.join(SPECIAL_PIECES)}); "
                             "choose another string")
            elif any(c.isspace() for c in symbol):
                found.append(f"{shown}: contains whitespace, which sentencepiece never matches inside a symbol "
                             "(the exported HF tokenizer would, so their ids would differ); use a symbol without spaces")
            elif _SPACE_SYMBOL in symbol:
                found.append(f"{shown}: contains U+2581, sentencepiece's own stand-in for a space")
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", symbol):
                found.append(f"{shown}: is a byte piece name; choose another string")
            elif symbol in seen:
                found.append(f"{shown}: given twice (also as {seen[symbol]})")
            seen.setdefault(symbol, flag)
    return found


def training_chunks(text: str, limit: int) -> Iterator[str]:
    """Splits `text` into pieces of at most `limit` UTF-8 bytes, at line ends where possible."""
    if len(text) * 4 <= limit or len(text.encode("utf-8")) <= limit:
        yield text
        return
    chunk: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line_size = len(line.encode("utf-8"))
        if size + line_size > limit and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        if line_size > limit:
            step = max(1, limit // 4)
            yield from (line[i : i + step] for i in range(0, len(line), step))
            continue
        chunk.append(line)
        size += line_size
    if chunk:
        yield "".join(chunk)


class _Fingerprinter:
    """Passes documents through while hashing them and counting documents and bytes.

    sentencepiece turns an exception raised inside its sentence iterator into a RuntimeError
    carrying a traceback, so a reading error is kept in `error` and the iteration just ends.
    """

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.documents = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def feed(self, documents: Iterable[str]) -> Iterator[str]:
        try:
            for text in documents:
                data = text.encode("utf-8")
                self.digest.update(len(data).to_bytes(8, "little"))
                self.digest.update(data)
                self.documents += 1
                self.bytes += len(data)
                yield text
        except BaseException as err:  # re-raised by train_tokenizer once sentencepiece returns
            self.error = err


def _trainer_arguments(options: TokenizerOptions) -> dict:
    return dict(
        model_type="bpe",
        vocab_size=options.vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=options.character_coverage,
        user_defined_symbols=list(options.user_symbols),
        control_symbols=list(options.control_symbols),
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOD_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        input_sentence_size=options.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=options.max_sentence_length,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def _user_error_from_trainer(err: RuntimeError, options: TokenizerOptions, inputs: str) -> LmforgeError:
    message = str(err).split("] ", 1)[-1].strip()
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return LmforgeError(
            f"{inputs}: --vocab-size {options.vocab_size} is too large for this corpus (at most "
            f"{too_high.group(2)} pieces can be learned from it); lower --vocab-size or add text"
        )
    return LmforgeError(f"{inputs}: sentencepiece cannot train with these options: {message}")


def _run_key(corpus: Corpus, options: TokenizerOptions) -> str:
    """Changes when the inputs (paths, sizes, mtimes), the options or sentencepiece may change the model."""
    spec = corpus.spec
    key = {"inputs": [n if n == "stdlib" else str(Path(n).resolve()) for n in spec.inputs],
           "spec": asdict(spec) | {"inputs": None}, "sources": corpus.source_key(), "options": asdict(options),
           "sentencepiece": spm.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tokenizer_is_current(spec: CorpusSpec, options: TokenizerOptions, output_dir: Path) -> bool:
    """True when DIR already holds the model these inputs and options would train (so training is skipped)."""
    try:
        meta = json.loads((Path(output_dir) / METADATA_FILE).read_text(encoding="utf-8"))
        model = (Path(output_dir) / MODEL_FILE).read_bytes()
    except (OSError, ValueError):
        return False
    return meta.get("run_key") == _run_key(Corpus(spec), options) and meta.get("model_sha256") == hashlib.sha256(model).hexdigest()


def train_tokenizer(spec: CorpusSpec, options: TokenizerOptions, output_dir: Path, progress: bool = True) -> Path:
    """Trains on the documents of `spec`; writes DIR/tokenizer.model and DIR/tokenizer.json; returns the .model path.

    When DIR already holds the model of the same inputs (paths, sizes, mtimes) and options, nothing is redone.
    """
    problems = symbol_problems(options)
    if problems:
        raise LmforgeError("\n".join(problems))
    corpus = Corpus(spec)
    ownership.check_output(Path(output_dir), "tokenizer", "prep tokenizer", "--output", corpus_inputs(spec))
    if tokenizer_is_current(spec, options, output_dir):
        return Path(output_dir) / MODEL_FILE
    with output_directory(Path(output_dir)) as directory:
        ownership.claim(directory, "tokenizer", "prep tokenizer")
        return _train_into(corpus, spec, options, directory, progress)


def _train_into(corpus: Corpus, spec: CorpusSpec, options: TokenizerOptions, output_dir: Path, progress: bool) -> Path:
    from tqdm import tqdm

    fingerprint = _Fingerprinter()
    limit = options.max_sentence_length
    documents = tqdm(corpus.documents(), desc="tokenizer: reading", unit=" docs", disable=not progress)
    chunks = (chunk for text in fingerprint.feed(documents) for chunk in training_chunks(text, limit))
    model = io.BytesIO()
    arguments = _trainer_arguments(options)
    spm.set_random_generator_seed(options.seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=chunks, model_writer=model, **arguments)
    except RuntimeError as err:
        if fingerprint.error is None:
            raise _user_error_from_trainer(err, options, describe_inputs(spec.inputs)) from None
    if fingerprint.error is not None:
        raise fingerprint.error
    model_path = output_dir / MODEL_FILE
    atomic_write_bytes(model_path, model.getvalue())
    tokenizer = Tokenizer.load(model_path)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": {
            name: {"id": token_id, "piece": tokenizer.id_to_piece(token_id)}
            for name, token_id in (("pad", PAD_ID), ("unk", UNK_ID), ("bos", BOS_ID), ("eod", EOD_ID))
        },
        "user_symbols": {s: tokenizer.piece_to_id(s) for s in options.user_symbols},
        "control_symbols": {s: tokenizer.piece_to_id(s) for s in options.control_symbols},
        "options": asdict(options),
        "trainer_arguments": {k: v for k, v in arguments.items() if k not in ("num_threads", "minloglevel")},
        "corpus": {
            "inputs": list(spec.inputs),
            "include": list(spec.include),
            "text_field": spec.text_field,
            "documents": fingerprint.documents,
            "bytes": fingerprint.bytes,
            "sha256": fingerprint.digest.hexdigest(),
            "skipped_documents": corpus.skipped_documents,
        },
        "sentencepiece_version": spm.__version__,
        "run_key": _run_key(corpus, options),
    }
    atomic_write_json(output_dir / METADATA_FILE, metadata)
    return model_path


class Tokenizer:
    """A trained model: exact `encode`/`decode`, special ids and the model file's sha256."""

    def __init__(self, model_bytes: bytes, model_path: Path | None = None) -> None:
        self._processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.model_path = model_path
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = self._processor.get_piece_size()
        self.pad_id, self.unk_id = self._processor.pad_id(), self._processor.unk_id()
        self.bos_id, self.eod_id = self._processor.bos_id(), self._processor.eos_id()
        self._space_symbol_ids = [self._processor.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]

    @classmethod
    def load(cls, path: Path | str) -> "Tokenizer":
        """Loads DIR/tokenizer.model or a .model file; a missing or broken file is a one-line error."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise LmforgeError(f"{model_path}: tokenizer model not found; create it with `lmforge prep tokenizer`")
        try:
            return cls(model_path.read_bytes(), model_path)
        except RuntimeError:
            raise LmforgeError(
                f"{model_path}: not a sentencepiece model; recreate it with `lmforge prep tokenizer`"
            ) from None

    def model_bytes(self) -> bytes:
        """The serialized model (what tokenizer.model holds)."""
        return self._processor.serialized_model_proto()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOD."""
        if _SPACE_SYMBOL not in text:
            return self._processor.encode(text)
        ids: list[int] = []
        for number, part in enumerate(text.split(_SPACE_SYMBOL)):
            if number:
                ids += self._space_symbol_ids
            if part:
                ids += self._processor.encode(part)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, on the calling thread only (the caller parallelises)."""
        batch = self._processor.encode(list(texts), num_threads=1)
        return [self.encode(t) if _SPACE_SYMBOL in t else ids for t, ids in zip(texts, batch)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; control tokens (PAD, BOS, EOD) decode to ''."""
        return self._processor.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._processor.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        return self._processor.piece_to_id(piece)
