"""The post-training config: shipped presets load, and the starting run decides the model and tokenizer."""
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from posttrain.config import load_posttrain_config
from posttrain.job import prepare_job
from posttrain.ppo_job import actor_train_section, critic_train_section, prepare_ppo

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "posttrain").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_preset_loads(path):
    config = load_posttrain_config(path)
    assert config.train.seq_len > config.data.max_prompt_len


def test_presets_exist_for_every_verb():
    assert {"sft", "reward", "ppo", "dpo"} <= {p.stem for p in PRESETS}


def fake_pretrained_run(root: Path, tokenizer_dir: Path, d_model: int = 32) -> Path:
    """A run directory as `lmforge train` leaves it (config.yaml, a complete checkpoint), without training."""
    run = root / "pre"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "COMPLETE").write_text("4\n")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    config = {"model": {"arch": "llama", "vocab_size": 512, "n_layers": 2, "n_heads": 4, "d_model": d_model,
                        "max_seq_len": 64}, "data": {"path": [str(tokenizer_dir)]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def sets(run_dir, **extra):
    values = {"run.dir": run_dir, "train.seq_len": 64, "data.max_prompt_len": 16, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_model_and_tokenizer_come_from_the_starting_run(tiny_corpus_shards, tmp_path):
    pre = fake_pretrained_run(tmp_path, tiny_corpus_shards.tokenizer_dir)
    job = prepare_job(load_posttrain_config("sft", sets(tmp_path / "out", **{"init.from_run": pre})), 1)
    assert job.config.model.d_model == 32 and job.config.model.vocab_size == 512
    assert job.config.init.tag == "step_00000004"
    assert job.config.init.tokenizer == tiny_corpus_shards.tokenizer_dir / "tokenizer.model"
    assert job.tokenizer.vocab_size == 512
    assert job.ds_config["train_micro_batch_size_per_gpu"] == 8


def test_a_contradicting_model_section_or_missing_checkpoint_is_a_one_line_error(tiny_corpus_shards, tmp_path):
    pre = fake_pretrained_run(tmp_path, tiny_corpus_shards.tokenizer_dir)
    with pytest.raises(LmforgeError, match="model: the model section comes from init.from_run"):
        prepare_job(load_posttrain_config("sft", sets(tmp_path / "out", **{"init.from_run": pre, "model.d_model": 48})), 1)
    (pre / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    with pytest.raises(LmforgeError, match="missing or incomplete"):
        prepare_job(load_posttrain_config("sft", sets(tmp_path / "out", **{"init.from_run": pre})), 1)
    with pytest.raises(LmforgeError, match="init.from_run and init.tokenizer are both null"):
        load_posttrain_config("sft", sets(tmp_path / "out", **{"init.from_run": "null"}))


def test_a_tokenizer_of_another_size_is_refused(tiny_corpus_shards, tmp_path):
    config = load_posttrain_config("sft", sets(tmp_path / "out", **{
        "init.from_run": "null", "init.tokenizer": tiny_corpus_shards.tokenizer_dir, "model.vocab_size": 1000}))
    with pytest.raises(LmforgeError, match="model.vocab_size = 1000 but the tokenizer"):
        prepare_job(config, 1)


def test_ppo_counts_iterations_but_deepspeed_schedules_optimizer_steps(tiny_corpus_shards, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    config = load_posttrain_config("ppo", sets(tmp_path / "out", **{
        "init.from_run": "null", "init.tokenizer": tiny_corpus_shards.tokenizer_dir, "data.train": prompts,
        "model.max_seq_len": 64, "ppo.reward_run": "null", "ppo.reward_function": "digit_fraction",
        "ppo.max_new_tokens": 16, "ppo.rollout_batch_size": 32, "ppo.epochs": 2, "train.micro_batch_size": 8,
        "train.grad_accum_steps": 2, "train.max_steps": 10, "train.warmup_steps": 2, "ppo.critic_lr": 1e-5}))
    assert actor_train_section(config).max_steps == 10 * 2 * 2
    assert actor_train_section(config).warmup_steps == 2 * 2 * 2
    assert critic_train_section(config).lr == 1e-5
    job = prepare_ppo(config, world_size=1)
    # 40 optimizer steps; WarmupCosineLR counts from the second (pretrain.ds_config.warmup_cosine_params)
    assert job.job.ds_config["scheduler"]["params"]["total_num_steps"] == 40 - 1
    assert job.critic_ds_config["optimizer"]["params"]["lr"] == 1e-5
    assert len(job.prompts) == 2
    bad = load_posttrain_config("ppo", sets(tmp_path / "out", **{
        "init.from_run": "null", "init.tokenizer": tiny_corpus_shards.tokenizer_dir, "data.train": prompts,
        "ppo.rollout_batch_size": 12, "train.micro_batch_size": 8, "ppo.reward_function": "digit_fraction"}))
    with pytest.raises(LmforgeError, match="ppo.rollout_batch_size = 12: must be a multiple") as err:
        prepare_ppo(bad, world_size=1)
    assert "set exactly one" in str(err.value)  # every problem in one message: the preset also names a reward_run


@pytest.mark.parametrize("key, value", [("train.max_bad_steps", "2"), ("train.eval_batches", "8")])
def test_pretraining_keys_post_training_ignores_are_refused_in_one_line(key, value, tmp_path):
    with pytest.raises(LmforgeError) as err:
        load_posttrain_config("sft", [f"{key}={value}"])
    assert str(err.value).startswith(f"{key}: not supported by post-training verbs yet (")
    assert "\n" not in str(err.value)
    preset = tmp_path / "mine.yaml"
    section, name = key.split(".")
    preset.write_text(yaml.safe_dump({section: {name: yaml.safe_load(value)}}))
    with pytest.raises(LmforgeError, match=rf"^{key}: not supported by post-training verbs yet"):
        load_posttrain_config(preset)
