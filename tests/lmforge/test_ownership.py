"""Nothing a user has is lost: a command writes only into folders it made, of its own kind, that do not
overlap its inputs (lmforge.ownership). Unit tests of the rules, then every verb through the real CLI,
each refusal proved by a snapshot of every file before and after."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import ownership
from lmforge.errors import LmforgeError
from tests.pretrain.bad_input_catalogue import TINY
from tests.pretrain.test_reliability_bad_inputs import snapshot
from tests.pretrain.training_runs import REPO, run_env


# ---- the rules, on folders made by hand ---------------------------------------------------------------------
def test_a_new_or_empty_output_is_accepted_and_claim_writes_the_marker(tmp_path):
    assert ownership.check_output(tmp_path / "new", "run", "train", "run.dir") == ""
    (tmp_path / "empty").mkdir()
    assert ownership.check_output(tmp_path / "empty", "run", "train", "run.dir") == ""
    ownership.claim(tmp_path / "new" / "deeper", "export", "export-hf")
    owner = json.loads((tmp_path / "new" / "deeper" / ownership.OWNER_FILE).read_text())
    assert (owner["kind"], owner["verb"]) == ("export", "export-hf")
    assert owner["created"].endswith("Z") and "lmforge_version" in owner
    assert ownership.check_output(tmp_path / "new" / "deeper", "export", "export-hf", "--output") == "export"


def test_an_output_overlapping_an_input_is_refused_in_each_direction(tmp_path):
    run, data = tmp_path / "run", tmp_path / "run" / "shards"
    with pytest.raises(LmforgeError, match=r"run.dir = .*/run holds data.path = .*/run/shards: an output must not overlap"):
        ownership.check_output(run, "run", "train", "run.dir", {"data.path": [data]})
    with pytest.raises(LmforgeError, match=r"--output .*/run is --checkpoint .*/run:"):
        ownership.check_output(run, "export", "export-hf", "--output", {"--checkpoint": run})
    with pytest.raises(LmforgeError, match=r"run.dir = .*/run/shards/sub is inside init.from_run = .*/run/shards"):
        ownership.check_output(data / "sub", "posttrain-run", "sft", "run.dir", {"init.from_run": data})
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(LmforgeError, match="is --model"):  # a symlink is the folder it points to
        ownership.check_output(tmp_path / "link", "run", "import-hf", "--output", {"--model": tmp_path / "real"})
    assert ownership.check_output(tmp_path / "runs" / "a", "run", "train", "run.dir", {"data.path": [tmp_path / "runs-data"]}) == ""


def test_a_folder_with_files_lmforge_did_not_write_is_refused_and_listed(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "notes.txt", "z.txt"):
        (mine / name).write_text("user")
    with pytest.raises(LmforgeError, match=r"files lmforge did not write \(config.yaml, metrics.jsonl, notes.txt and 1 more\)"):
        ownership.check_output(mine, "run", "train", "run.dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError, match="exists and is not a directory"):
        ownership.check_output(tmp_path / "file", "export", "export-hf", "--output")
    # lmforge's own transient files do not count as the user's
    only_ours = tmp_path / "ours"
    only_ours.mkdir()
    (only_ours / ".lock").write_text("")
    (only_ours / ".write_probe123").write_text("")
    (only_ours / ".config.yaml.tmp99").write_text("")
    assert ownership.check_output(only_ours, "run", "train", "run.dir") == ""


def test_a_folder_of_another_kind_or_verb_is_refused(tmp_path):
    ownership.claim(tmp_path / "pre", "run", "train")
    with pytest.raises(LmforgeError, match=r"is a pretraining run directory made by `lmforge train`, not a post-training run"):
        ownership.check_output(tmp_path / "pre", "posttrain-run", "sft", "run.dir")
    ownership.claim(tmp_path / "sft", "posttrain-run", "sft")
    (tmp_path / "sft" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(LmforgeError, match="holds a 'sft' run, not 'dpo'"):
        ownership.check_output(tmp_path / "sft", "posttrain-run", "dpo", "run.dir")
    ownership.claim(tmp_path / "shards", "shards", "prep shards")
    with pytest.raises(LmforgeError, match="is a shard directory made by `lmforge prep shards`, not a Hugging Face export"):
        ownership.check_output(tmp_path / "shards", "export", "export-hf", "--output")


def test_folders_made_before_markers_are_recognised_by_their_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "COMPLETE").write_text("{}")
    (run / "config.yaml").write_text("model: {d_model: 32}\nrun: {dir: x}\n")
    assert ownership.legacy_kind(run) == "run"
    (run / "config.yaml").write_text("model: {d_model: 32}\nrun: {dir: x}\ninit: {from_run: null}\n")
    assert ownership.check_output(run, "posttrain-run", "sft", "run.dir") == "posttrain-run"
    # config.yaml and metrics but no checkpoint (deleted to save space): not a run to resume
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert ownership.legacy_kind(run) is None
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "tokenizer.model").write_bytes(b"x")
    (shards / "manifest.json").write_text("{}")
    assert ownership.legacy_kind(shards) == "shards"
    export = tmp_path / "hf"
    export.mkdir()
    header = json.dumps({"__metadata__": {"lmforge_checkpoint": "step_00000002"}}).encode()
    (export / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (export / "config.json").write_text("{}")
    assert ownership.legacy_kind(export) == "export"
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()  # someone else's HF model
    (export / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert ownership.legacy_kind(export) is None


def test_config_paths_lists_every_path_valued_key_but_run_dir():
    from posttrain.config import load_posttrain_config
    from pretrain.config import load_pretrain_config

    paths = ownership.config_paths(load_pretrain_config("tiny", ["data.path=[a, b]"]))
    assert paths["data.path"] == [Path("a"), Path("b")] and "deepspeed.config" in paths and "run.dir" not in paths
    post = ownership.config_paths(load_posttrain_config("sft", ["init.from_run=pre", "init.tokenizer=tok"]))
    assert post["init.from_run"] == [Path("pre")] and post["init.tokenizer"] == [Path("tok")]


# ---- every verb through the real CLI ------------------------------------------------------------------------
def lmforge(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def train_args(ws: Path, run: Path, *sets: str, config: str = "tiny") -> list[str]:
    args = ["train", "--config", config, "--set", f"run.dir={run}", "--set", f"data.path=[{ws / 'shards'}]", *TINY,
            "--set", "train.max_steps=2", "--set", "train.warmup_steps=1"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture()
def ws(finished_tiny_run, tmp_path) -> Path:
    """A copy of the finished 2-step run and its shards."""
    shutil.copytree(finished_tiny_run, tmp_path / "ws")
    return tmp_path / "ws"


@pytest.mark.slow
def test_export_hf_never_replaces_its_run_or_a_folder_holding_it(ws):
    before = snapshot(ws)
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "run", "--overwrite"),
                   f"--output {ws / 'run'} is --checkpoint {ws / 'run'}")
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws, "--overwrite"),
                   f"--output {ws} holds --checkpoint {ws / 'run'}")
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "run" / "hf"), "is inside --checkpoint")
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "shards", "--overwrite"),
                   "is a shard directory", "not a Hugging Face export")
    assert snapshot(ws) == before


@pytest.mark.slow
def test_export_hf_overwrite_replaces_only_an_earlier_export(ws):
    first = lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "hf")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((ws / "hf" / ownership.OWNER_FILE).read_text())["kind"] == "export"
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "hf"), "holds an earlier export; pass --overwrite")
    again = lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "hf", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (ws / "hf" / "model.safetensors").is_file()
    (ws / "hf" / "my_notes.md").write_text("results of my evaluation")  # --overwrite must not delete this
    before = snapshot(ws)
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "hf", "--overwrite"),
                   "the earlier export there now also holds files it did not write (my_notes.md)")
    assert snapshot(ws) == before
    (ws / "theirs").mkdir()
    (ws / "theirs" / "README.md").write_text("a model I downloaded")
    before = snapshot(ws)
    assert_refused(lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "theirs", "--overwrite"),
                   "files lmforge did not write (README.md)")
    assert snapshot(ws) == before


@pytest.mark.slow
def test_train_refuses_a_folder_of_user_files_or_of_another_kind(ws):
    (ws / "mine").mkdir()
    (ws / "mine" / "config.yaml").write_text("# my settings, with comments\ntrain:\n  max_steps: 2\n")
    (ws / "old").mkdir()
    (ws / "old" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    (ws / "old" / "config.yaml").write_text("model: {}\nrun: {}\n")
    before = snapshot(ws)
    mine = ws / "mine" / "config.yaml"
    assert_refused(lmforge(*train_args(ws, ws / "mine", config=str(mine))), "files lmforge did not write (config.yaml)")
    assert_refused(lmforge(*train_args(ws, ws / "old")), "files lmforge did not write (config.yaml, metrics.jsonl)")
    assert_refused(lmforge(*train_args(ws, ws / "shards")), f"run.dir = {ws / 'shards'} is data.path = {ws / 'shards'}")
    assert_refused(lmforge(*train_args(ws, ws / "shards" / "run")), "is inside data.path")
    assert_refused(lmforge(*train_args(ws, ws)), f"run.dir = {ws} holds data.path")
    assert snapshot(ws) == before


@pytest.mark.slow
def test_a_run_made_before_markers_resumes_and_is_adopted(ws):
    (ws / "run" / ownership.OWNER_FILE).unlink()
    result = lmforge(*train_args(ws, ws / "run", "train.max_steps=3", "run.log_interval=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert json.loads((ws / "run" / ownership.OWNER_FILE).read_text())["kind"] == "run"


@pytest.mark.slow
def test_prep_outputs_never_overlap_their_inputs_or_user_folders(ws, tiny_corpus_shards):
    corpus = ws / "corpus"
    corpus.mkdir()
    for path in tiny_corpus_shards.files[:3]:
        shutil.copy(path, corpus / path.name)
    tokenizer = tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("mine")
    before = snapshot(ws)
    assert_refused(lmforge("prep", "tokenizer", "--input", corpus, "--output", corpus, "--vocab-size", "300"),
                   f"--output {corpus} is --input {corpus}")
    assert_refused(lmforge("prep", "tokenizer", "--input", corpus, "--output", ws, "--vocab-size", "300"), "holds --input")
    assert_refused(lmforge("prep", "tokenizer", "--input", corpus, "--output", ws / "notes", "--vocab-size", "300"),
                   "files lmforge did not write (todo.txt)")
    assert_refused(lmforge("prep", "shards", "--input", corpus, "--tokenizer", tokenizer, "--output", corpus / "shards"),
                   "is inside --input")
    assert_refused(lmforge("prep", "shards", "--input", corpus, "--tokenizer", tokenizer, "--output", ws / "run"),
                   "is a pretraining run directory")
    assert snapshot(ws) == before
    made = lmforge("prep", "shards", "--input", corpus, "--tokenizer", tokenizer, "--output", ws / "new", "--workers", "1")
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.loads((ws / "new" / ownership.OWNER_FILE).read_text())["kind"] == "shards"


@pytest.mark.slow
def test_import_hf_refuses_its_model_folder_and_a_run(ws):
    exported = lmforge("export-hf", "--checkpoint", ws / "run", "--output", ws / "hf")
    assert exported.returncode == 0, exported.stderr[-3000:]
    before = snapshot(ws)
    assert_refused(lmforge("import-hf", "--model", ws / "hf", "--output", ws / "hf"), f"--output {ws / 'hf'} is --model")
    assert_refused(lmforge("import-hf", "--model", ws / "hf", "--output", ws / "run"), "already holds checkpoints")
    assert_refused(lmforge("import-hf", "--model", ws / "hf", "--output", ws / "shards"), "is a shard directory")
    assert snapshot(ws) == before
