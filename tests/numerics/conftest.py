import pytest


@pytest.fixture
def shards(tiny_corpus_shards):
    """The session's tiny shard directory (built once by tests/conftest.py)."""
    return tiny_corpus_shards.shard_dir
