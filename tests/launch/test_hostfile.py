"""launch.hostfile reads hostfiles and applies --include/--exclude/--num_nodes/--num_gpus exactly as DeepSpeed's runner does."""
from __future__ import annotations

import pytest

from launch.hostfile import read_hostfile, select_slots
from lmforge.errors import LmforgeError

HOSTS = "# the cluster\nworker-0 slots=4\n\n   worker-1 slots=4   \nworker-2 slots=2 max_slots=2\n"


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(HOSTS)
    return path


def test_hosts_and_slots_match_deepspeeds_parser(hostfile):
    from deepspeed.launcher.runner import fetch_hostfile

    parsed, problems = read_hostfile(hostfile)
    assert problems == []
    assert parsed.slots == dict(fetch_hostfile(str(hostfile))) == {"worker-0": 4, "worker-1": 4, "worker-2": 2}
    assert parsed.total_slots == 10


@pytest.mark.parametrize("include, exclude, num_nodes, num_gpus", [
    ("", "", -1, -1),
    ("worker-1", "", -1, -1),
    ("worker-0:0,2@worker-2", "", -1, -1),
    ("worker-0:1@worker-0:3", "", -1, -1),
    ("", "worker-1", -1, -1),
    ("", "worker-0:0,1@worker-2:1", -1, -1),
    ("", "", 2, -1),
    ("", "", -1, 1),
    ("", "", 2, 8),
])
def test_selected_slots_match_deepspeeds_runner(hostfile, include, exclude, num_nodes, num_gpus):
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile, parse_inclusion_exclusion

    expected = apply_num_nodes_and_gpus(parse_inclusion_exclusion(fetch_hostfile(str(hostfile)), include, exclude),
                                        num_nodes, num_gpus)
    parsed, _ = read_hostfile(hostfile)
    assert select_slots(parsed, include, exclude, num_nodes, num_gpus) == dict(expected)


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-0 slots=8\nworker-1 8\nworker-0 slots=8\nworker-3 slots=0\n")
    parsed, problems = read_hostfile(path)
    assert parsed is None
    assert problems == [
        f"{path}:2: 'worker-1 8': expected 'HOST slots=N', e.g. 'worker-0 slots=8'",
        f"{path}:3: host 'worker-0' is listed twice; DeepSpeed refuses duplicate hosts",
        f"{path}:4: 'worker-3 slots=0': slots must be at least 1",
    ]


def test_a_hostfile_of_comments_only_is_a_problem(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# nothing yet\n\n")
    assert read_hostfile(path) == (None, [f"{path}: no 'HOST slots=N' lines; DeepSpeed needs at least one host"])


@pytest.mark.parametrize("include, exclude, message", [
    ("worker-9", "", "host 'worker-9' is not in"),
    ("worker-2:5", "", "worker-2 has slots 0-1"),
    ("worker-0:a", "", r"expected HOST\[:SLOT,SLOT\.\.\.\]"),
    ("worker-0", "worker-1", "mutually exclusive"),
    ("", "worker-0@worker-1@worker-2", "leaves no slots"),
])
def test_bad_filters_are_one_line_errors(hostfile, include, exclude, message):
    parsed, _ = read_hostfile(hostfile)
    with pytest.raises(LmforgeError, match=message):
        select_slots(parsed, include, exclude)
