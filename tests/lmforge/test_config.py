"""The typed config loader: every problem in one error, closest-key hints, overrides, files saved."""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lmforge.config import config_from_mapping, config_to_dict, load_config, parse_overrides, save_config
from lmforge.errors import LmforgeError
from pretrain.config import PretrainConfig, load_pretrain_config

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_preset_loads_against_the_code():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"tiny", "gpt2-124m", "gpt2-350m", "llama-350m", "llama-1b", "llama-7b"} <= set(names)
    for name in names:
        config = load_pretrain_config(name)
        assert config.train.seq_len <= config.model.max_seq_len


def test_overrides_are_typed_from_yaml_and_applied():
    config = load_pretrain_config("tiny", ["train.max_steps=70", "train.lr=3e-4", "model.arch=gpt2", "data.path=[a, b]"])
    assert config.train.max_steps == 70
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.arch == "gpt2"
    assert config.data.path == (Path("a"), Path("b"))


def test_all_problems_are_reported_at_once_with_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: many\n  lrr: 0.1\nmodel:\n  arch: gpt3\nrunn:\n  dir: x\n")
    with pytest.raises(LmforgeError) as err:
        load_config(PretrainConfig, path)
    message = str(err.value)
    assert f"{path}: train.max_steps = 'many': expected an integer" in message
    assert "unknown key 'train.lrr'; did you mean 'lr'?" in message
    assert "model.arch = 'gpt3': expected one of 'gpt2', 'llama'" in message
    assert "unknown section 'runn'; did you mean 'run'?" in message
    assert len(message.splitlines()) == 4  # one line each (run_cli prints an `error:` line per problem)


def test_cross_field_checks_name_both_keys():
    with pytest.raises(LmforgeError, match=r"train.min_lr = 0.5: must be between 0 and train.lr = 0.1"):
        load_pretrain_config("tiny", ["train.lr=0.1", "train.min_lr=0.5"])


def test_malformed_override_and_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(LmforgeError, match="expected section.key=value"):
        parse_overrides(["max_steps=3"])
    path = tmp_path / "broken.yaml"
    path.write_text("train: [\n")
    with pytest.raises(LmforgeError, match=r"broken.yaml \(line \d+\): not valid YAML"):
        load_config(PretrainConfig, path)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_pretrain_config("llama-1b", ["run.dir=/tmp/x"])
    save_config(config, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data == config_to_dict(config)
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == config


def test_off_read_by_yaml_as_false_is_the_literal_choice_off_in_set_and_in_files(tmp_path):
    assert load_pretrain_config("llama-1b", ["train.float8=off"]).train.float8 == "off"
    path = tmp_path / "fp8.yaml"
    path.write_text("train:\n  float8: off\n")
    assert load_config(PretrainConfig, path).train.float8 == "off"


def test_a_choice_not_allowed_stays_a_one_line_error_naming_file_and_key():
    with pytest.raises(LmforgeError) as err:
        load_pretrain_config("llama-1b", ["train.float8=bogus"])
    preset = REPO / "configs" / "llama-1b.yaml"
    assert str(err.value) == f"{preset}: train.float8 = 'bogus': expected one of 'off', 'tensorwise', 'rowwise', 'auto'"
    with pytest.raises(LmforgeError) as err:  # `on` is read as True, and no choice spells True
        load_pretrain_config("llama-1b", ["train.float8=on"])
    assert "train.float8 = True: expected one of 'off', 'tensorwise', 'rowwise', 'auto' (YAML reads unquoted" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_off_and_on_for_a_bool_field_stay_booleans():
    assert load_pretrain_config("tiny", ["train.compile=off"]).train.compile is False
    assert load_pretrain_config("tiny", ["train.compile=on"]).train.compile is True

    @dataclass(frozen=True)
    class Section:
        mode: Literal["off", "auto"] | bool = "auto"

    @dataclass(frozen=True)
    class Job:
        section: Section = Section()

    assert config_from_mapping(Job, {"section": {"mode": False}}).section.mode is False  # the bool, not "off"
