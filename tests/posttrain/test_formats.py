"""JSONL inputs: every malformed line is one error naming the file and line; the chat template's learned mask."""
import json
import re

import pytest

from data_prep.tokenizer import Tokenizer
from lmforge.errors import LmforgeError
from posttrain.formats import (PREFERENCE_SHAPE, PROMPT_SHAPE, SFT_SHAPE, SFTExample, Turn, parse_preference,
                               parse_prompt, parse_sft, read_records, split_records)
from posttrain.template import render_prompt, render_sft
from tests.posttrain.runs import run_verb, tiny_model_sets, write_jsonl

GOOD_SFT = {"prompt": "def f():\n", "response": "    return 1\n"}
GOOD_PAIR = {"prompt": "x = ", "chosen": "1\n", "rejected": "(\n"}


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus_shards):
    return Tokenizer.load(tiny_corpus_shards.tokenizer_dir)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "a", "response": ', "not valid JSON"),
    ('["prompt", "response"]', "a JSON list, not an object"),
    ('{"prompt": "a"}', '"response" is missing'),
    ('{"prompt": 3, "response": "b"}', '"prompt" is a int'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', '"messages"[0] must be'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_bad_sft_line_is_reported_with_file_and_line_number(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, "", GOOD_SFT, bad_line, GOOD_SFT])
    with pytest.raises(LmforgeError) as err:
        read_records(path, parse_sft, SFT_SHAPE)
    text = str(err.value)
    assert text.startswith(f"{path}:4: ")  # blank line 2 still counts
    assert message in text and "\n" not in text


def test_bad_preference_and_prompt_lines_name_their_line(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, {"prompt": "x", "chosen": "a", "rejected": None}])
    with pytest.raises(LmforgeError, match=rf"^{re.escape(str(pairs))}:2: \"rejected\" is missing or null, not a string; expected"):
        read_records(pairs, parse_preference, PREFERENCE_SHAPE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(LmforgeError, match=rf"^{re.escape(str(prompts))}:2: \"prompt\" must end with a user message"):
        read_records(prompts, parse_prompt, PROMPT_SHAPE)


def test_missing_and_empty_files_are_one_line_errors(tmp_path):
    with pytest.raises(LmforgeError, match="file not found"):
        read_records(tmp_path / "nope.jsonl", parse_sft, SFT_SHAPE)
    with pytest.raises(LmforgeError, match="no records"):
        read_records(write_jsonl(tmp_path / "empty.jsonl", [""]), parse_sft, SFT_SHAPE)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "\xe9", "response": "x"}\n')
    with pytest.raises(LmforgeError, match="not UTF-8"):
        read_records(tmp_path / "latin1.jsonl", parse_sft, SFT_SHAPE)


def test_valid_split_is_a_stable_hash_of_each_line(tmp_path):
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(400)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    train, valid = split_records(path, None, 0.1, parse_sft, SFT_SHAPE)
    assert len(train) + len(valid) == 400 and 20 < len(valid) < 60
    write_jsonl(path, list(reversed(records)))  # order does not matter, content does
    _, valid_again = split_records(path, None, 0.1, parse_sft, SFT_SHAPE)
    assert sorted(v.prompt for v in valid_again) == sorted(v.prompt for v in valid)


def test_raw_template_learns_only_the_response_and_its_eod(tokenizer):
    rendered = render_sft(tokenizer, SFTExample("def f():\n", "    return 1\n"), max_prompt_len=64, seq_len=64)
    prompt_ids = [tokenizer.eod_id] + tokenizer.encode("def f():\n")
    response_ids = tokenizer.encode("    return 1\n") + [tokenizer.eod_id]
    assert rendered.ids == prompt_ids + response_ids
    assert rendered.learned == [False] * len(prompt_ids) + [True] * len(response_ids)


def test_chat_template_learns_assistant_turns_only(tokenizer):
    turns = (Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "bye"),
             Turn("assistant", "ok"))
    rendered = render_sft(tokenizer, SFTExample(turns, None), max_prompt_len=64, seq_len=256)
    bos, eod = tokenizer.bos_id, tokenizer.eod_id
    assert rendered.ids[0] == eod and rendered.ids.count(bos) == 5 and rendered.ids.count(eod) == 6
    learned_text = tokenizer.decode([i for i, keep in zip(rendered.ids, rendered.learned) if keep and i != eod])
    assert learned_text == "hellook"
    assert sum(1 for i, keep in zip(rendered.ids, rendered.learned) if keep and i == eod) == 2
    prompt = render_prompt(tokenizer, turns[:2])
    assert prompt[-len(tokenizer.encode("assistant\n")) - 1] == bos
    assert tokenizer.decode(prompt) == "system\nbe briefuser\nhiassistant\n"


def test_long_prompts_keep_their_end_and_responses_are_cut_to_seq_len(tokenizer):
    prompt = "word " * 100
    ids = render_prompt(tokenizer, prompt, max_len=10)
    assert len(ids) == 10 and ids == ([tokenizer.eod_id] + tokenizer.encode(prompt))[-10:]
    rendered = render_sft(tokenizer, SFTExample(prompt, "x " * 100), max_prompt_len=10, seq_len=30)
    assert len(rendered) == 30 and rendered.learned.count(True) == 20


@pytest.mark.slow
@pytest.mark.parametrize("verb, bad", [
    ("sft", '{"prompt": "a", "respnse": "b"}'),
    ("reward", '{"prompt": "a", "chosen": "b"'),
    ("dpo", '{"prompt": "a", "chosen": "b", "rejected": 7}'),
    ("ppo", '{"text": "a"}'),
])
def test_cli_reports_a_malformed_line_in_one_line_with_exit_2(verb, bad, tiny_corpus_shards, tmp_path):
    good = {"sft": GOOD_SFT, "reward": GOOD_PAIR, "dpo": GOOD_PAIR, "ppo": {"prompt": "x"}}[verb]
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, bad])
    sets = {**tiny_model_sets(tiny_corpus_shards.tokenizer_dir, tmp_path / "run"), "data.train": data}
    if verb == "ppo":
        sets.update({"ppo.reward_run": "null", "ppo.reward_function": "digit_fraction", "ppo.rollout_batch_size": 8, "ppo.max_new_tokens": 16})
    result = run_verb(verb, sets)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {data}:3: ") and "Traceback" not in result.stderr
    json.dumps(lines)  # plain text
