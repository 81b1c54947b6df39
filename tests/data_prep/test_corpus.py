import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.corpus import Corpus, CorpusSpec, stdlib_files, stdlib_root
from lmforge.errors import LmforgeError

RECORDS = [{"text": "first doc\n"}, {"text": "second\tdoc ▁ 中文"}, {"text": ""}, {"body": "x", "text": "third"}]
EXPECTED = ["first doc\n", "second\tdoc ▁ 中文", "third"]


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def read_all(*inputs, **options) -> list[str]:
    return list(Corpus(CorpusSpec(inputs=tuple(str(i) for i in inputs), **options)).documents())


def test_directory_is_read_recursively_in_sorted_order_with_include_globs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("z = 1\n")
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "notes.txt").write_text("notes")
    assert read_all(tmp_path) == ["a = 1\n", "z = 1\n", "notes"]
    assert read_all(tmp_path, include=("*.py",)) == ["a = 1\n", "z = 1\n"]
    assert read_all(tmp_path, include=("b/*",)) == ["z = 1\n"]


def test_text_file_is_one_document_kept_byte_exact(tmp_path):
    text = "\ufeffline1\r\n\tline2\n\n\n  "
    (tmp_path / "doc.txt").write_bytes(text.encode("utf-8"))
    assert read_all(tmp_path / "doc.txt") == [text]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_readers_yield_the_text_field_of_each_record(tmp_path, suffix):
    data = _jsonl_bytes(RECORDS) + b"\n"
    compress = {".jsonl": bytes, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}
    path = tmp_path / f"data{suffix}"
    path.write_bytes(compress[suffix](data))
    assert read_all(path) == EXPECTED


def test_jsonl_text_field_is_configurable(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes([{"content": "a"}, {"content": "b"}]))
    assert read_all(path, text_field="content") == ["a", "b"]
    with pytest.raises(LmforgeError, match=r"d.jsonl: line 1: no field 'text', not a string"):
        read_all(path)


def test_parquet_reader_streams_row_groups(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"text": [f"doc {i}" for i in range(25)], "id": list(range(25))})
    pq.write_table(table, path, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert read_all(path) == [f"doc {i}" for i in range(25)]
    with pytest.raises(LmforgeError, match=r"no column 'body' \(columns: text, id\)"):
        read_all(path, text_field="body")


def test_undecodable_text_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(LmforgeError, match=r"bad.txt: byte 6: not valid UTF-8.*--skip-bad-documents"):
        read_all(path)


def test_undecodable_jsonl_offset_counts_from_file_start(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "b\xc3("}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl: byte 26 \(line 2\)"):
        read_all(path)


def test_skip_bad_documents_skips_and_counts(tmp_path):
    (tmp_path / "a.txt").write_text("good")
    (tmp_path / "b.txt").write_bytes(b"\xfe\xfe")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "x"}\nnot json\n{"text": "\xff"}\n')
    corpus = Corpus(CorpusSpec(inputs=(str(tmp_path),), skip_bad_documents=True))
    assert list(corpus.documents()) == ["good", "x"]
    assert corpus.skipped_documents == 3


def test_missing_input_is_an_error_naming_it(tmp_path):
    with pytest.raises(LmforgeError, match=r"nope.txt: input not found"):
        Corpus(CorpusSpec(inputs=(str(tmp_path / "nope.txt"),)))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match=r"empty corpus"):
        read_all(tmp_path)
    with pytest.raises(LmforgeError, match=r"empty corpus, no non-empty documents matching \*.rs"):
        read_all(tmp_path, include=("*.rs",))


def test_stdlib_is_every_py_file_outside_site_packages_in_sorted_order():
    files = stdlib_files()
    root = stdlib_root()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    assert len(files) > 500 and "os.py" in relative and "json/decoder.py" in relative
    assert not any("site-packages" in r or "dist-packages" in r for r in relative)
    assert all(r.endswith(".py") for r in relative)


def test_reading_is_streamed_one_document_at_a_time(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(str(i))
    documents = Corpus(CorpusSpec(inputs=(str(tmp_path),))).documents()
    assert next(documents) == "0"
    (tmp_path / "2.txt").write_text("changed after the first read")
    assert list(documents) == ["1", "changed after the first read"]


@pytest.mark.parametrize("name", ["bad.jsonl.gz", "bad.jsonl.zst", "bad.parquet"])
def test_corrupt_compressed_or_parquet_file_is_a_one_line_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(LmforgeError, match=rf"{name}: cannot read \(.+\); expected a"):
        read_all(tmp_path / name)


def test_fifos_devices_and_dangling_links_in_a_directory_are_skipped_with_a_count_never_opened(tmp_path, capsys):
    import os

    (tmp_path / "a.py").write_text("a = 1\n")
    os.mkfifo(tmp_path / "pipe")  # opening it would block forever: nobody writes to it
    (tmp_path / "gone.py").symlink_to(tmp_path / "missing.py")
    (tmp_path / "null").symlink_to("/dev/null")
    corpus = Corpus(CorpusSpec(inputs=(str(tmp_path),)))
    assert list(corpus.documents()) == ["a = 1\n"]
    assert dict(corpus.skipped_files) == {"FIFO": 1, "dangling symlink": 1, "character device": 1}
    assert "note: skipped 1 FIFO, 1 character device, 1 dangling symlink in the input directories" in capsys.readouterr().err


def test_parquet_nulls_follow_the_jsonl_rule_error_or_skip_with_a_count(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b", None]}), path)
    with pytest.raises(LmforgeError, match=r"d.parquet: row 2: 'text' is null, not a string; pass --skip-bad-documents"):
        read_all(path)
    corpus = Corpus(CorpusSpec(inputs=(str(path),), skip_bad_documents=True))
    assert list(corpus.documents()) == ["a", "b"] and corpus.skipped_documents == 2
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(LmforgeError, match=r"d.jsonl: line 2: 'text' is null, not a string"):
        read_all(jsonl)


def test_a_column_or_field_of_another_type_is_named_with_its_type(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(LmforgeError, match=r"n.parquet: column 'text' holds int64, not text"):
        read_all(tmp_path / "n.parquet")
    (tmp_path / "n.jsonl").write_text('{"text": 3.5}\n')
    with pytest.raises(LmforgeError, match=r"n.jsonl: line 1: 'text' is float, not a string"):
        read_all(tmp_path / "n.jsonl")
