"""The one set of launch checks (pretrain.run_checks.check_launch) that train and preflight both run, and
DeepSpeed JSON validation against DeepSpeed's own models (pretrain.ds_json_checks)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from data_prep.corpus import CorpusSpec
from data_prep.shards import ShardOptions, build_shards
from lmforge.errors import run_cli
from pretrain import console, run_checks
from pretrain.config import REPO_ROOT, TrainConfig, load_pretrain_config
from pretrain.ds_json_checks import SECTION_MODELS, TOP_LEVEL_KEYS, _model, deepspeed_json_problems


def tiny_config(tmp_path: Path, shards: Path, *sets: str):
    return load_pretrain_config("tiny", [f"run.dir={tmp_path / 'run'}", f"data.path=[{shards}]", "model.n_layers=2",
                                         "model.d_model=32", "train.seq_len=32", "train.micro_batch_size=2", *sets])


def test_train_reports_every_launch_problem_at_once_one_line_each_and_creates_nothing(shards, tmp_path, capsys):
    from pretrain.train import main

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {"stage": 3}, "bf16": True}))
    argv = ["--config", "tiny", "--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.path=[{shards}]",
            "--set", "model.vocab_size=1000", "--set", f"deepspeed.config={ds}"]
    assert run_cli(main, argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "model.vocab_size = 1000" in lines[0]
    assert "unknown key 'zero_optimisation'" in lines[1] and "did you mean 'zero_optimization'?" in lines[1]
    assert "bf16 = True: expected an object" in lines[2]
    assert not (tmp_path / "run").exists()


def test_prepare_and_preflight_run_the_same_check(shards, tmp_path, monkeypatch):
    """Both entry points call run_checks.check_launch (preflight adds only hosts and the launcher)."""
    import launch.preflight
    import pretrain.train

    calls = []
    real = run_checks.check_launch
    monkeypatch.setattr(run_checks, "check_launch", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    pretrain.train.prepare(tiny_config(tmp_path, shards), 1)
    launch.preflight.check(launch.preflight.parse_args(["--set", f"data.path=[{shards}]", "--set", f"run.dir={tmp_path / 'r2'}",
                                                        "--world-size", "2"]))
    assert calls == [1, 2]
    assert not (tmp_path / "r2").exists()  # preflight creates no run dir (only --deepspeed-env writes into it)


def test_a_manifest_whose_tokenizer_copy_disagrees_is_refused_by_train_too(shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 600
    (copy / "manifest.json").write_text(json.dumps(manifest))
    found = run_checks.check_launch(tiny_config(tmp_path, copy), 1, verify_checksums=False)
    assert any("tokenizer.model: 512 tokens but its manifest says 600" in p for p in found.problems), found.problems


@pytest.mark.parametrize("save_interval, max_steps, keep_last, at_once", [
    (0, 100, 3, 1),     # saved at the end only: one checkpoint, whatever keep_last
    (10, 100, 3, 4),    # ten saves: keep_last + the one being written
    (10, 20, 3, 2),     # two saves: never more than are written
    (50, 100, 1, 2),
])
def test_the_disk_check_counts_the_checkpoints_on_disk_at_once(save_interval, max_steps, keep_last, at_once):
    train = TrainConfig(save_interval=save_interval, max_steps=max_steps, keep_last=keep_last, warmup_steps=1)
    assert run_checks.checkpoints_at_once(train) == at_once


def test_a_run_that_saves_once_fits_where_keep_last_plus_one_would_not(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    params = 10_000_000  # 160 MB per checkpoint
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**12, 0, 300_000_000))
    _, problem = run_checks.disk_space_problem(tmp_path / "run", params, TrainConfig(save_interval=0, keep_last=3))
    assert problem is None
    _, problem = run_checks.disk_space_problem(tmp_path / "run", params, TrainConfig(save_interval=10, keep_last=3))
    assert "checkpoints need 640.0 MB" in problem and "up to 4 on disk with train.keep_last = 3" in problem


def test_a_valid_split_shorter_than_one_sequence_is_a_note_at_start(stdlib_subset, tiny_corpus_shards, tmp_path):
    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(20)))
    shards = tmp_path / "shards"
    build_shards(spec, tiny_corpus_shards.tokenizer_dir / "tokenizer.model", shards,
                 ShardOptions(valid_fraction=0.0, workers=1), progress=False)
    found = run_checks.check_launch(tiny_config(tmp_path, shards), 1)
    assert found.problems == []
    notes = [note for note in found.notes if "valid split" in note]  # beside the one-rank ZeRO-1 note
    assert len(notes) == 1 and "the valid split of data.path has 0 tokens" in notes[0]
    assert "fewer than one sequence of train.seq_len + 1 = 33: no evaluation" in notes[0]


def test_the_start_line_counts_parameters_from_the_config_not_the_partitioned_module():
    from pretrain.model import ModelConfig, Transformer

    model = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=512)
    assert run_checks.parameter_count(model) == Transformer(model).num_params() > 0


def test_every_shipped_deepspeed_json_passes_and_every_model_named_exists():
    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        assert deepspeed_json_problems(json.loads(path.read_text()), path) == [], path
    for section in SECTION_MODELS:
        assert section in TOP_LEVEL_KEYS and hasattr(_model(section), "model_fields"), section


def test_deepspeed_itself_rejects_what_the_check_rejects_inside_known_sections():
    """The check asks DeepSpeed's own model: the same config fails in DeepSpeed with the same field."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    raw = {"zero_optimization": {"stage": 2, "overlap_com": True}}
    assert deepspeed_json_problems(raw, Path("x.json")) == [
        "x.json: unknown key 'zero_optimization.overlap_com' (DeepSpeed does not read it); did you mean 'overlap_comm'?"]
    with pytest.raises(pydantic.ValidationError, match="overlap_com"):
        DeepSpeedZeroConfig(**raw["zero_optimization"])
    assert deepspeed_json_problems({"zero_optimization": {"stage": 3, "overlap_comm": "auto"}}, Path("x")) == []


def test_deepspeed_warnings_go_to_the_run_log_and_others_to_the_console(tmp_path):
    log = tmp_path / console.DEEPSPEED_LOG
    shown = []
    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest: shown.append(str(message))  # the console
        console.keep_deepspeed_warnings_in(log, main=True)
        warnings.warn_explicit("torch.cuda.amp.custom_fwd is deprecated", FutureWarning,
                               "/venv/lib/python3.11/site-packages/deepspeed/runtime/zero/linear.py", 47)
        warnings.warn_explicit("a warning of ours", UserWarning, "/repo/pretrain/train.py", 1)
    assert shown == ["a warning of ours"]
    assert "deepspeed/runtime/zero/linear.py:47: FutureWarning: torch.cuda.amp.custom_fwd is deprecated" in log.read_text()


def test_prepare_keeps_the_config_it_checked(shards, tmp_path):
    from pretrain.train import prepare

    run = prepare(tiny_config(tmp_path, shards), 1)
    assert run.config.model.vocab_size == 512 and run.ds_config["train_batch_size"] == 2
    assert (tmp_path / "run").is_dir()  # created only once every check passed
    assert [note.split(":")[0] for note in run.notes] == ["ZeRO-1 on one rank"]  # pretrain.ds_config.as_zero0_on_one_rank
    assert run.ds_config["zero_optimization"] == {"stage": 0}


def test_a_gpt2_model_with_grouped_query_attention_is_refused_before_training_not_when_reading_old_runs(shards, tmp_path):
    config = tiny_config(tmp_path, shards, "model.arch=gpt2", "model.n_heads=4", "model.n_kv_heads=2")
    found = run_checks.check_launch(config, 1)
    assert found.problems == ["model.n_kv_heads = 2: a gpt2 model has one key/value head per query head (HF's GPT2LMHeadModel "
                              "has no grouped-query attention, so it could never be exported); set it to null or 4, or use "
                              "model.arch = llama"]
    assert run_checks.check_launch(tiny_config(tmp_path, shards, "model.arch=gpt2", "model.n_kv_heads=null"), 1).problems == []


# A ZeRO-3 JSON on one rank runs as ZeRO-0 (pretrain.ds_config.as_zero0_on_one_rank): nothing partitions the head there
@pytest.mark.parametrize("json_name, keep, refused", [("zero3", "false", True), ("zero3", "true", False), ("zero2", "true", False)])
def test_the_chunked_head_is_refused_where_zero3_partitions_its_weight(shards, tmp_path, json_name, keep, refused):
    config = tiny_config(tmp_path, shards, "model.loss_chunk_tokens=64", f"deepspeed.config=ds_configs/{json_name}.json",
                         f"deepspeed.one_rank_zero0={keep}")
    found = run_checks.check_launch(config, 1, verify_checksums=False)
    chunk_lines = [p for p in found.problems if p.startswith("model.loss_chunk_tokens = 64")]
    assert len(chunk_lines) == (1 if refused else 0), found.problems
    if not refused:
        assert found.problems == []


@pytest.mark.parametrize("scope, float8, refused", [("nested", "tensorwise", True), ("model", "tensorwise", False),
                                                    ("nested", "off", False)])
def test_float8_is_refused_inside_the_nested_compile_region(shards, tmp_path, scope, float8, refused):
    config = tiny_config(tmp_path, shards, "train.compile=true", f"train.compile_scope={scope}", f"train.float8={float8}")
    found = run_checks.check_launch(config, 1, verify_checksums=False)
    nested_lines = [p for p in found.problems if p.startswith("train.compile_scope = nested")]
    assert nested_lines == ([f"train.compile_scope = nested: not supported with train.float8 = '{float8}' (inductor cannot "
                             "compile torchao's float8 linear inside a nested compile region); use compile_scope: model, "
                             "or train.float8 = off"] if refused else []), found.problems
    if float8 == "off":
        assert found.problems == []
