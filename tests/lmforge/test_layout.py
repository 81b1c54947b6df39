"""The layout README.md promises: every verb of `lmforge --help` in its folder's row of the layout
table, each verb's module in that folder, and no folder with more than a third of the code."""
from __future__ import annotations

import re
from pathlib import Path

from lmforge.cli import VERBS

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lmforge", "data_prep", "parallel", "numerics", "pretrain", "posttrain", "run_tools", "launch", "bench")


def layout_rows() -> dict[str, str]:
    """folder -> its 'verbs' cell in README.md's layout table."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if m := re.match(r"\| `(\w+)/` \| ([^|]*) \|", line):
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_verb_is_in_the_row_of_the_folder_that_holds_it():
    rows = layout_rows()
    for verb, (module, _) in VERBS.items():
        folder = module.split(".")[0]
        assert (REPO / folder / (module.split(".", 1)[1].replace(".", "/") + ".py")).is_file(), module
        assert f"`{verb}`" in rows[folder], f"README.md's layout row for {folder}/ does not name `{verb}`"
    named = {v for cell in rows.values() for v in re.findall(r"`([\w-]+)`", cell)}
    assert named == set(VERBS), "the layout table names verbs the CLI does not have"


def test_no_folder_holds_more_than_a_third_of_the_code():
    lines = {p: sum(len(f.read_text().splitlines()) for f in (REPO / p).rglob("*.py")) for p in PACKAGES}
    total = sum(lines.values())
    assert total > 5000
    for package, count in lines.items():
        assert count <= total / 3, f"{package}/ holds {count} of {total} lines"
