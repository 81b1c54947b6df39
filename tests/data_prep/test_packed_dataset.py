import shutil

import numpy as np
import pytest

from data_prep.corpus import CorpusSpec
from data_prep.indexed_dataset import IndexedDataset
from data_prep.manifest import load_manifest
from data_prep.packed_dataset import BlendedDataset, FeistelPermutation, PackedDataset, build_dataset
from data_prep.shards import ShardOptions, build_shards
from data_prep.tokenizer import TokenizerOptions, train_tokenizer
from lmforge.errors import LmforgeError

SEQ_LEN = 64


def stream_of(shard_dir, split) -> np.ndarray:
    manifest = load_manifest(shard_dir)
    return np.concatenate([IndexedDataset(shard_dir / s.path).tokens for s in manifest.split_shards(split)]).astype(np.int64)


def test_windows_are_consecutive_seq_len_plus_one_slices_of_the_split_stream(tiny_corpus_shards):
    ds = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=0)
    stream = stream_of(tiny_corpus_shards.shard_dir, "train")
    assert ds.num_tokens == len(stream)
    assert ds.num_windows == (len(stream) - 1) // SEQ_LEN
    for w in [0, 1, ds.num_windows // 2, ds.num_windows - 1]:
        assert np.array_equal(ds.window(w), stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1])
    # windows overlap by one token (last target = next first input) and cross shard boundaries
    assert ds.window(0)[-1] == ds.window(1)[0]
    first_shard_tokens = load_manifest(tiny_corpus_shards.shard_dir).split_shards("train")[0].tokens
    crossing = first_shard_tokens // SEQ_LEN
    assert np.array_equal(ds.window(crossing), stream[crossing * SEQ_LEN : (crossing + 1) * SEQ_LEN + 1])


def test_windows_cross_document_boundaries_with_eod_inside(tiny_corpus_shards):
    ds = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=0)
    inside = [w for w in range(ds.num_windows) if 3 in ds.window(w)[1:-1].tolist()]
    assert inside, "some window must hold an EOD (id 3) between two documents"


def test_sample_is_int64_of_seq_len_plus_one(tiny_corpus_shards):
    sample = PackedDataset(tiny_corpus_shards.shard_dir, "valid", SEQ_LEN, seed=0).sample(12345)
    assert sample.dtype == np.int64 and sample.shape == (SEQ_LEN + 1,)


def test_each_epoch_visits_every_window_once_in_a_new_order(tiny_corpus_shards):
    ds = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=7)
    n = ds.num_windows
    epoch0 = [ds.window_index(i) for i in range(n)]
    epoch1 = [ds.window_index(n + i) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))


def test_sample_is_a_pure_function_of_seed_and_index(tiny_corpus_shards):
    indices = [0, 5, 10**6, 3, 10**9 + 17, 5]
    a = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    b = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    c = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=2)
    forward = [a.sample(i) for i in indices]
    backward = [b.sample(i) for i in reversed(indices)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))
    assert [a.window_index(i) for i in range(50)] != [c.window_index(i) for i in range(50)]


def test_pickled_dataset_is_small_and_samples_the_same(tiny_corpus_shards):
    import pickle

    ds = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=3)
    data = pickle.dumps(ds)
    assert len(data) < 20_000  # the recipe, not the tokens
    assert np.array_equal(pickle.loads(data).sample(777), ds.sample(777))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = FeistelPermutation(n, key=12345)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_blend_honours_weights_and_reads_each_dataset_in_its_own_order(tiny_corpus_shards):
    train = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    valid = PackedDataset(tiny_corpus_shards.shard_dir, "valid", SEQ_LEN, seed=2)
    blend = BlendedDataset([train, valid], [3.0, 1.0], seed=0)
    sources = [blend.source(i) for i in range(20_000)]
    share = sum(1 for d, _ in sources if d == 1) / len(sources)
    assert abs(share - 0.25) < 0.005
    # dataset d's k-th draw is d.sample(k): each dataset's draws are 0, 1, 2, ... in order
    assert [k for d, k in sources if d == 1][:100] == list(range(100))
    assert np.array_equal(blend.sample(10), [train, valid][sources[10][0]].sample(sources[10][1]))
    again = BlendedDataset([train, valid], [3.0, 1.0], seed=0)
    assert [again.source(i) for i in (19_999, 7, 4096)] == [sources[19_999], sources[7], sources[4096]]


def test_blend_seed_changes_the_order_not_the_mix(tiny_corpus_shards):
    train = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    valid = PackedDataset(tiny_corpus_shards.shard_dir, "valid", SEQ_LEN, seed=2)
    a = [BlendedDataset([train, valid], [0.9, 0.1], seed=0).source(i)[0] for i in range(4096)]
    b = [BlendedDataset([train, valid], [0.9, 0.1], seed=1).source(i)[0] for i in range(4096)]
    assert a != b and sum(a) == sum(b) == round(0.1 * 4096)


def test_bad_weights_are_one_line_errors(tiny_corpus_shards):
    train = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    with pytest.raises(LmforgeError, match=r"expected non-negative numbers with a positive sum"):
        BlendedDataset([train, train], [1.0, -1.0], seed=0)
    with pytest.raises(LmforgeError, match=r"2 data paths but 1 weights"):
        build_dataset([tiny_corpus_shards.shard_dir] * 2, [1.0], "train", SEQ_LEN, 0)


def test_build_dataset_of_one_path_is_its_packed_split(tiny_corpus_shards):
    ds = build_dataset([tiny_corpus_shards.shard_dir], None, "train", SEQ_LEN, seed=4)
    assert isinstance(ds, PackedDataset)
    assert np.array_equal(ds.sample(99), PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, 4).sample(99))
    assert ds.vocab_size == 512 and ds.eod_id == 3


def test_build_dataset_mixes_paths_by_tokens_without_weights(tiny_corpus_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_corpus_shards.shard_dir, copy)
    ds = build_dataset([tiny_corpus_shards.shard_dir, copy], None, "train", SEQ_LEN, seed=0)
    assert isinstance(ds, BlendedDataset) and np.allclose(ds.weights, [0.5, 0.5])


def test_build_dataset_refuses_shards_of_different_tokenizers(tiny_corpus_shards, tmp_path, stdlib_subset):
    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(5)))
    model = train_tokenizer(spec, TokenizerOptions(vocab_size=400), tmp_path / "tok", progress=False)
    build_shards(spec, model, tmp_path / "other", ShardOptions(workers=1, valid_fraction=0.0), progress=False)
    with pytest.raises(LmforgeError, match=r"other: made with tokenizer .* all data paths must share one tokenizer"):
        build_dataset([tiny_corpus_shards.shard_dir, tmp_path / "other"], None, "train", SEQ_LEN, 0)


def test_build_dataset_verifies_checksums(tiny_corpus_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_corpus_shards.shard_dir, copy)
    idx = copy / "train_00000.idx"
    idx.write_bytes(idx.read_bytes()[:-1] + b"\x01")
    with pytest.raises(LmforgeError, match=r"train_00000.idx: sha256"):
        build_dataset([copy], None, "train", SEQ_LEN, 0)


def test_missing_split_and_too_short_split_are_one_line_errors(tiny_corpus_shards, tmp_path, stdlib_subset):
    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(3)))
    build_shards(spec, tiny_corpus_shards.tokenizer_dir, tmp_path / "s", ShardOptions(workers=1, valid_fraction=0.0), progress=False)
    with pytest.raises(LmforgeError, match=r"no 'valid' shards"):
        PackedDataset(tmp_path / "s", "valid", SEQ_LEN, 0)
    with pytest.raises(LmforgeError, match=r"fewer than seq_len \+ 1"):
        PackedDataset(tmp_path / "s", "train", 10**7, 0)


# `samples(first, count)`, the batched read: the same rows as `sample`, bit for bit


def per_sample(ds, first: int, count: int) -> np.ndarray:
    return np.stack([ds.sample(first + k) for k in range(count)])


def assert_samples_match(ds, first: int, count: int) -> None:
    batch = ds.samples(first, count)
    assert batch.dtype == np.int64 and batch.shape == (count, ds.seq_len + 1)
    assert np.array_equal(batch, per_sample(ds, first, count))


@pytest.fixture(scope="module")
def one_document_a_part(tiny_corpus_shards, stdlib_subset, tmp_path_factory):
    """Shards of one document each (shard_tokens=1): many parts, some shorter than a window."""
    out = tmp_path_factory.mktemp("one_document_a_part")
    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(12)))
    options = ShardOptions(workers=1, valid_fraction=0.0, shard_tokens=1)
    build_shards(spec, tiny_corpus_shards.tokenizer_dir / "tokenizer.model", out, options, progress=False)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097, 2**32 - 5])
def test_feistel_many_equals_calling_it_for_each_position(n):
    perm = FeistelPermutation(n, key=777)
    positions = list(range(min(n, 2000))) + ([n - 1, n // 2, n // 3] if n > 2000 else [])
    assert perm.many(positions) == [perm(i) for i in positions]
    if n in (5, 17, 4097):  # a quarter of 2**(2 * half) or so: the first round trip often leaves range(n)
        assert sum(perm._round_trip(i) >= n for i in range(n)) > n // 4


def test_feistel_many_beyond_its_tables_falls_back_to_the_same_values():
    perm = FeistelPermutation(2**40 + 5, key=3)
    assert perm._half > FeistelPermutation.TABLE_HALF_BITS
    positions = [0, 1, 2**39, 2**40 + 4]
    assert perm.many(positions) == [perm(i) for i in positions]


def test_samples_equal_samples_one_by_one_across_shard_parts(one_document_a_part):
    ds = PackedDataset(one_document_a_part, "train", SEQ_LEN, seed=5)
    starts = np.arange(ds.num_windows) * SEQ_LEN
    spanning = np.searchsorted(ds._starts, starts, "right") != np.searchsorted(ds._starts, starts + SEQ_LEN, "right")
    assert len(ds._parts) >= 10 and spanning.sum() >= 9  # windows that run over into the next part(s)
    assert_samples_match(ds, 0, ds.num_windows)  # a whole epoch: every window, spanning ones included
    for first in [0, 1, 7, ds.num_windows // 2, 10**6 + 3]:
        assert_samples_match(ds, first, 16)


def test_samples_cross_epoch_boundaries(tiny_corpus_shards):
    ds = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=9)
    n = ds.num_windows
    for first in [n - 5, 2 * n - 1, 3 * n, 3 * n + n - 7, 10**9 + 17]:
        assert_samples_match(ds, first, 16)
    assert_samples_match(ds, n // 2, n + 40)  # three epochs in one call
    assert ds.samples(7, 0).shape == (0, SEQ_LEN + 1)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_samples_of_a_few_windows_walk_cycles_and_epochs_the_same(tiny_corpus_shards, n):
    tokens = PackedDataset(tiny_corpus_shards.shard_dir, "valid", SEQ_LEN, seed=0).num_tokens
    ds = PackedDataset(tiny_corpus_shards.shard_dir, "valid", (tokens - 1) // n, seed=11)
    assert ds.num_windows == n
    count = 4 * n + 3  # several epochs, each its own permutation
    assert_samples_match(ds, 0, count)
    assert_samples_match(ds, 3 * n + 1, count)
    if n > 2:  # each epoch a new order, yet every window once
        orders = [tuple(ds.window_indices(e * n, n)) for e in range(4)]
        assert len(set(orders)) > 1 and all(sorted(o) == list(range(n)) for o in orders)


def test_blended_samples_equal_samples_one_by_one(tiny_corpus_shards, one_document_a_part):
    train = PackedDataset(tiny_corpus_shards.shard_dir, "train", SEQ_LEN, seed=1)
    small = PackedDataset(one_document_a_part, "train", SEQ_LEN, seed=2)
    blend = BlendedDataset([train, small], [3.0, 1.0], seed=4)
    read = set()
    for first, count in [(0, 16), (blend.block - 8, 16), (5 * blend.block + 100, 300), (10**7 + 1, 16)]:
        batch = blend.samples(first, count)
        assert batch.dtype == np.int64 and np.array_equal(batch, per_sample(blend, first, count))
        datasets, indices = blend.sources(first, count)
        assert [(int(d), int(k)) for d, k in zip(datasets, indices)] == [blend.source(first + j) for j in range(count)]
        read |= set(datasets.tolist())
    assert read == {0, 1}
