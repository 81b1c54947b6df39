"""Post-training runs are as safe as pretraining's: a run.dir that is its own starting run, a pretraining
run or another verb's run is refused; a resume checks the checkpoint's checksums (pretrain.resume.choose_tag)
and falls back only when asked; a finished run says so. Real `lmforge sft` / `dpo` runs, from scratch."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain import checkpoint
from tests.lmforge.test_ownership import assert_refused
from tests.posttrain.runs import read_metrics, run_verb, tiny_model_sets, write_jsonl
from tests.posttrain.synthetic import separable_pairs
from tests.pretrain.test_reliability_bad_inputs import snapshot

pytestmark = pytest.mark.slow


def sft_sets(ws: Path, tokenizer_dir: Path, run_dir: Path, **more) -> dict:
    return {**tiny_model_sets(tokenizer_dir, run_dir), "data.train": ws / "sft.jsonl", "train.max_steps": 4,
            "train.save_interval": 2, "train.keep_last": 2, "train.seq_len": 32, "data.max_prompt_len": 16,
            "train.micro_batch_size": 4, **more}


@pytest.fixture(scope="module")
def sft_workspace(finished_tiny_run, tiny_corpus_shards, tmp_path_factory) -> Path:
    """The finished pretraining run, its shards, sft.jsonl and pairs.jsonl, and `sft/`: a 4-step SFT run
    from scratch with checkpoints at steps 2 and 4."""
    ws = tmp_path_factory.mktemp("sft_ws")
    shutil.copytree(finished_tiny_run, ws, dirs_exist_ok=True)
    write_jsonl(ws / "sft.jsonl", [{"prompt": f"# {a} plus {a}\n", "response": f"x = {2 * a}\n"} for a in range(40)])
    write_jsonl(ws / "pairs.jsonl", separable_pairs(32, seed=0))
    result = run_verb("sft", sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "sft"))
    assert result.returncode == 0, result.stderr[-3000:]
    return ws


@pytest.fixture()
def ws(sft_workspace, tmp_path) -> Path:
    shutil.copytree(sft_workspace, tmp_path / "ws")
    return tmp_path / "ws"


def test_sft_into_its_own_starting_run_is_refused_and_the_pretraining_run_is_untouched(ws, tiny_corpus_shards):
    before = snapshot(ws)
    for run_dir, how in ((ws / "run", "is init.from_run"), (ws / "run" / "sft", "is inside init.from_run"),
                         (ws, "holds init.from_run")):
        sets = {**sft_sets(ws, tiny_corpus_shards.tokenizer_dir, run_dir), "init.from_run": ws / "run", "init.tokenizer": "null"}
        for key in [k for k in sets if k.startswith("model.")]:
            del sets[key]
        assert_refused(run_verb("sft", sets), f"run.dir = {run_dir} {how} = {ws / 'run'}")
    assert snapshot(ws) == before


def test_a_post_training_verb_into_a_pretraining_run_or_another_verbs_run_is_refused(ws, tiny_corpus_shards):
    before = snapshot(ws)
    assert_refused(run_verb("sft", sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "run")),
                   f"run.dir = {ws / 'run'}: is a pretraining run directory made by `lmforge train`, not a post-training run")
    dpo = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, ws / "sft"), "data.train": ws / "pairs.jsonl", "train.max_steps": 2}
    assert_refused(run_verb("dpo", dpo), f"run.dir = {ws / 'sft'}: holds a 'sft' run, not 'dpo'")
    (ws / "mine").mkdir()
    (ws / "mine" / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(ws)
    assert_refused(run_verb("sft", sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "mine")),
                   "files lmforge did not write (metrics.jsonl)")
    assert snapshot(ws) == before


def test_a_bit_flipped_sft_checkpoint_is_refused_and_resume_fallback_continues_from_the_previous(ws, tiny_corpus_shards):
    folder = ws / "sft" / "checkpoints" / "step_00000004"
    states = next(folder.glob("mp_rank_00_model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    before = snapshot(ws)
    sets = sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "sft", **{"train.max_steps": 6})
    error = assert_refused(run_verb("sft", sets), f"{states}: sha256 does not match the checkpoint record")
    assert "--resume-fallback" in error and "step_00000002" in error
    assert snapshot(ws) == before
    fallback = run_verb("sft", {**sets, "run.resume_fallback": "true"})
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "falling back to" in fallback.stdout and f"resumed from {ws / 'sft' / 'checkpoints' / 'step_00000002'} at step 2" in fallback.stdout
    assert [r["step"] for r in read_metrics(ws / "sft") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.latest_tag(ws / "sft") == "step_00000006"


def test_a_damaged_sft_complete_record_is_one_line(ws, tiny_corpus_shards):
    record = ws / "sft" / "checkpoints" / "step_00000004" / "COMPLETE"
    record.write_text("[1, 2")
    before = snapshot(ws)
    sets = sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "sft", **{"train.max_steps": 6})
    assert_refused(run_verb("sft", sets), f"{record}: not a checkpoint record (expected JSON)")
    assert snapshot(ws) == before


def test_a_finished_sft_run_says_nothing_to_do_and_changes_nothing(ws, tiny_corpus_shards):
    before = snapshot(ws)
    result = run_verb("sft", sft_sets(ws, tiny_corpus_shards.tokenizer_dir, ws / "sft"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"nothing to do: {ws / 'sft'} already at step 4 ≥ train.max_steps = 4" in result.stdout
    assert snapshot(ws) == before


def test_ppo_resume_checks_the_actor_and_critic_and_a_finished_run_has_nothing_to_do(tiny_corpus_shards, tmp_path):
    from tests.posttrain.synthetic import prompts
    from tests.posttrain.test_ppo import ppo_sets

    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts(32, seed=0))
    sets = ppo_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "ppo", prompt_file, **{
        "train.max_steps": 2, "train.save_interval": 2, "ppo.rollout_batch_size": 8, "ppo.epochs": 1, "ppo.max_new_tokens": 8})
    first = run_verb("ppo", sets)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(tmp_path)
    done = run_verb("ppo", sets)
    assert done.returncode == 0 and f"nothing to do: {tmp_path / 'ppo'} already at step 2 ≥ train.max_steps = 2" in done.stdout
    assert snapshot(tmp_path) == before
    critic = next((tmp_path / "ppo" / "critic" / "checkpoints" / "step_00000002").glob("mp_rank_00_model_states.pt"))
    data = bytearray(critic.read_bytes())
    data[len(data) // 2] ^= 0x01
    critic.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    assert_refused(run_verb("ppo", {**sets, "train.max_steps": 4}), f"{critic}: sha256 does not match the checkpoint record",
                   "the critic of")
    assert snapshot(tmp_path) == before
