import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.corpus import CorpusSpec
from data_prep.tokenizer import Tokenizer, TokenizerOptions, train_tokenizer, training_chunks
from lmforge.errors import LmforgeError

HOSTILE = [
    "",
    "def f():\n    return 1\n",
    "\tindented\twith\ttabs\n",
    "windows\r\nline\r\nends\r\n",
    "\n\n\n",
    "   leading spaces",
    "trailing spaces   ",
    "  ",
    "emoji 😀👩‍👩‍👧 and CJK 中文字符 and mixed русский العربية हिन्दी",
    "the space stand-in ▁ itself ▁▁ and ▁",
    "nul \x00 and controls \x01\x7f\x1b[0m",
    "\ufeffbom and \u00a0nbsp \u3000ideographic space \u200bzero width",
    "ﬁ ligature and e\u0301 combining (must not be NFKC-normalised)",
    "<s></s><pad><unk> look like specials",
    "<|user|> is a user symbol, <|ctl|> a control one",
    "digits 1234567890 and 3.14159",
]


@pytest.fixture(scope="module")
def hostile_tokenizer(tmp_path_factory, stdlib_subset):
    """Trained on stdlib files plus the hostile strings, with a user and a control symbol."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "hostile.txt").write_text("\n".join(HOSTILE * 20), encoding="utf-8")
    inputs = tuple(str(p) for p in stdlib_subset(10)) + (str(root / "hostile.txt"),)
    options = TokenizerOptions(vocab_size=600, user_symbols=("<|user|>",), control_symbols=("<|ctl|>",))
    train_tokenizer(CorpusSpec(inputs=inputs), options, root / "tok", progress=False)
    return Tokenizer.load(root / "tok")


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_round_trips_exactly(hostile_tokenizer, text):
    assert hostile_tokenizer.decode(hostile_tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_any_text_round_trips_exactly(hostile_tokenizer, text):
    assert hostile_tokenizer.decode(hostile_tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet=" \t\r\n\u2581ab中😀", max_size=30), max_size=8))
def test_batch_encoding_equals_one_by_one(hostile_tokenizer, texts):
    assert hostile_tokenizer.encode_batch(texts) == [hostile_tokenizer.encode(t) for t in texts]


def test_special_ids_are_fixed_and_user_symbols_are_single_pieces(hostile_tokenizer):
    tok = hostile_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eod_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 600
    user = tok.piece_to_id("<|user|>")
    assert tok.encode("a<|user|>b").count(user) == 1
    assert tok.piece_to_id("<|ctl|>") not in tok.encode("<|ctl|>")
    assert tok.decode([tok.bos_id, tok.eod_id, tok.pad_id]) == ""


def test_encode_adds_no_bos_or_eod(hostile_tokenizer):
    ids = hostile_tokenizer.encode("hello world")
    assert ids and not {hostile_tokenizer.bos_id, hostile_tokenizer.eod_id} & set(ids)


def test_tokenizer_json_records_ids_options_corpus_and_fingerprint(tiny_corpus_shards):
    directory = tiny_corpus_shards.tokenizer_dir
    meta = json.loads((directory / "tokenizer.json").read_text())
    model_sha = hashlib.sha256((directory / "tokenizer.model").read_bytes()).hexdigest()
    tok = Tokenizer.load(directory)
    assert tok.fingerprint == model_sha == meta["model_sha256"]
    assert meta["vocab_size"] == tok.vocab_size == tiny_corpus_shards.vocab_size
    assert meta["special_tokens"]["eod"] == {"id": 3, "piece": "</s>"}
    assert meta["special_tokens"]["pad"]["id"] == 0
    assert meta["trainer_arguments"]["model_type"] == "bpe"
    assert meta["trainer_arguments"]["byte_fallback"] is True
    assert meta["trainer_arguments"]["normalization_rule_name"] == "identity"
    corpus_bytes = sum(len(p.read_bytes()) for p in tiny_corpus_shards.files)
    assert meta["corpus"]["documents"] == len(tiny_corpus_shards.files)
    assert meta["corpus"]["bytes"] == corpus_bytes
    assert len(meta["corpus"]["sha256"]) == 64
    assert meta["sentencepiece_version"]


def test_training_is_repeatable(tmp_path, stdlib_subset):
    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(5)))
    first = train_tokenizer(spec, TokenizerOptions(vocab_size=400), tmp_path / "a", progress=False)
    second = train_tokenizer(spec, TokenizerOptions(vocab_size=400), tmp_path / "b", progress=False)
    assert first.read_bytes() == second.read_bytes()


def test_vocab_too_large_for_corpus_is_a_one_line_error(tmp_path):
    (tmp_path / "small.txt").write_text("just a few words, repeated a few times\n" * 5)
    with pytest.raises(LmforgeError) as err:
        train_tokenizer(CorpusSpec(inputs=(str(tmp_path / "small.txt"),)), TokenizerOptions(vocab_size=32000),
                        tmp_path / "tok", progress=False)
    assert "--vocab-size 32000 is too large for this corpus" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "tok" / "tokenizer.model").exists()


def test_load_of_a_missing_model_names_the_path(tmp_path):
    with pytest.raises(LmforgeError, match=r"tokenizer.model: tokenizer model not found"):
        Tokenizer.load(tmp_path)


def test_long_documents_are_fed_to_the_trainer_in_line_aligned_chunks():
    text = "".join(f"line {i}\n" for i in range(1000))
    chunks = list(training_chunks(text, 100))
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 100 and c.endswith("\n") for c in chunks)
    huge_line = "x" * 1000
    assert "".join(training_chunks(huge_line, 100)) == huge_line


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [32000, 50257])
def test_large_vocabularies_train_on_the_stdlib(tmp_path, vocab_size):
    train_tokenizer(CorpusSpec(inputs=("stdlib",)), TokenizerOptions(vocab_size=vocab_size), tmp_path, progress=False)
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == vocab_size
    text = "import os\n\n\ndef main():\n\treturn os.getcwd()  # ▁ 中文\r\n"
    assert tok.decode(tok.encode(text)) == text
