import struct

import numpy as np
import pytest

from data_prep.indexed_dataset import IndexedDataset, IndexedDatasetWriter, token_dtype
from lmforge.errors import LmforgeError

DOCUMENTS = [[5, 6, 7, 3], [3], [65535, 0, 3], [9, 9, 9, 9, 9, 3]]


def write(prefix, documents, dtype):
    writer = IndexedDatasetWriter(prefix, dtype)
    for doc in documents:
        writer.add_document(np.array(doc))
    return writer.finish()


def test_idx_matches_the_megatron_layout_byte_by_byte(tmp_path):
    write(tmp_path / "s", DOCUMENTS, np.uint16)
    raw = (tmp_path / "s.idx").read_bytes()
    magic, version, code, sequences, doc_entries = struct.unpack_from("<9sQBQQ", raw, 0)
    assert (magic, version, code, sequences, doc_entries) == (b"MMIDIDX\x00\x00", 1, 8, 4, 5)
    offset = 9 + 8 + 1 + 8 + 8
    assert offset == 34
    sizes = struct.unpack_from("<4i", raw, offset)
    pointers = struct.unpack_from("<4q", raw, offset + 16)
    document_index = struct.unpack_from("<5q", raw, offset + 16 + 32)
    assert sizes == (4, 1, 3, 6)
    assert pointers == (0, 8, 10, 16)  # byte offsets: uint16 is 2 bytes a token
    assert document_index == (0, 1, 2, 3, 4)
    assert len(raw) == offset + 16 + 32 + 40


def test_bin_is_the_raw_little_endian_tokens(tmp_path):
    write(tmp_path / "s", DOCUMENTS, np.uint16)
    flat = [t for doc in DOCUMENTS for t in doc]
    assert (tmp_path / "s.bin").read_bytes() == struct.pack(f"<{len(flat)}H", *flat)


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4)])
def test_reader_returns_each_document(tmp_path, dtype, code):
    write(tmp_path / "s", DOCUMENTS, dtype)
    ds = IndexedDataset(tmp_path / "s")
    assert (tmp_path / "s.idx").read_bytes()[17] == code
    assert len(ds) == 4 and ds.dtype == np.dtype(dtype) and ds.num_tokens == 14
    assert [ds[i].tolist() for i in range(4)] == DOCUMENTS
    assert ds.sizes.tolist() == [4, 1, 3, 6]


def test_token_dtype_is_uint16_up_to_65536_ids_then_int32():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


def test_finish_returns_the_sha256_of_both_files(tmp_path):
    import hashlib

    bin_sha, idx_sha = write(tmp_path / "s", DOCUMENTS, np.uint16)
    assert bin_sha == hashlib.sha256((tmp_path / "s.bin").read_bytes()).hexdigest()
    assert idx_sha == hashlib.sha256((tmp_path / "s.idx").read_bytes()).hexdigest()


def test_unfinished_writer_leaves_no_shard_files(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "s", np.uint16)
    writer.add_document(np.array([1, 2, 3]))
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_bin_is_a_one_line_error(tmp_path):
    write(tmp_path / "s", DOCUMENTS, np.uint16)
    (tmp_path / "s.bin").write_bytes(b"\x00\x00")
    with pytest.raises(LmforgeError, match=r"s.bin: 2 bytes, but its index lists 14 tokens"):
        IndexedDataset(tmp_path / "s")


def test_foreign_idx_is_a_one_line_error(tmp_path):
    (tmp_path / "s.idx").write_bytes(b"TNTIDX\x00\x00" + bytes(40))
    (tmp_path / "s.bin").write_bytes(b"")
    with pytest.raises(LmforgeError, match=r"s.idx: header is magic=.*not a Megatron MMIDIDX index"):
        IndexedDataset(tmp_path / "s")
