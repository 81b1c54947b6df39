"""Fixtures of the launch tests: the session's tiny shard set and a real SLURM cluster."""
from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import SlurmCluster, local_host_names, missing_requirements


@pytest.fixture
def shards(tiny_corpus_shards):
    return tiny_corpus_shards.shard_dir


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + two slurmd (two 'nodes' of this machine, 2 fake GPUs each), stopped at the end.

    Falls back to one node where this SLURM build cannot run two slurmd on one host; the
    multi-node tests then skip with the reason.
    """
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    names = local_host_names()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), names[:2])
    try:
        cluster.start()
    except RuntimeError as err:
        cluster.stop()
        if len(cluster.nodes) < 2:
            raise
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm1"), names[:1], two_node_failure=str(err).splitlines()[0])
        cluster.start()
    yield cluster
    cluster.stop()
