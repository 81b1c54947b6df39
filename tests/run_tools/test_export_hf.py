"""export-hf: transformers alone (no lmforge importable) reproduces lmforge's logits, greedy text and tokens."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.packed_dataset import PackedDataset
from lmforge.errors import run_cli
from run_tools import export_hf
from run_tools.run_config import load_checked_model
from tests.pretrain.training_runs import REPO, run_env, run_training

# Each run varies what the mapping must get right: GQA/MQA, tied or not, biases or none, a padded vocab.
RUNS = {
    "llama-zero0": dict(nproc=1, stage=0, sets={"model.arch": "llama"}),
    "llama-zero3": dict(nproc=2, stage=3, sets={"model.arch": "llama", "model.n_kv_heads": 1,
                                                "model.tie_embeddings": "true", "model.bias": "true"}),
    "gpt2-zero0": dict(nproc=1, stage=0, sets={"model.arch": "gpt2", "model.n_kv_heads": "null",
                                               "model.pad_vocab_to_multiple": 96}),
    "gpt2-zero3": dict(nproc=2, stage=3, sets={"model.arch": "gpt2", "model.n_kv_heads": "null", "model.bias": "false",
                                               "model.tie_embeddings": "false", "model.d_ff": 96}),
}
NEW_TOKENS = 20
HOSTILE_TEXTS = [
    "def main(argv):\n    if not argv:\n        return 1\n\tprint('tab-indented')\n",
    "line one\r\nline two\r\n\r\n  trailing spaces   \r\n",
    "emoji 😀🎉👨‍👩‍👧 and CJK 汉字テスト한국어, RTL שלום, combining é, nbsp\u00a0here",
    "   leading spaces, runs of    spaces and\t\t\ttabs\n\n\n",
    "literal sentencepiece space \u2581 and \u2581\u2581 doubled",
    "special-looking text <s> </s> <pad> <unk> stays text",
    "digits 1234567890 3.14159e-10, control \x00\x01\x7f, zero width \u200b\u200d",
    "",
    " ",
]

# Runs in a clean interpreter: no PYTHONPATH, cwd outside the repo, and lmforge's packages unimportable.
HF_SIDE = r'''
import copy, importlib.abc, json, sys

class NoLmforge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lmforge", "pretrain", "data_prep", "posttrain", "run_tools", "launch", "tests"):
            raise ImportError(f"the exported model must not need {name}")
        return None

sys.meta_path.insert(0, NoLmforge())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

request = json.load(open(sys.argv[1]))
results = {}
for name, job in request["models"].items():
    model = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["dir"])
    with torch.no_grad():
        logits = model(torch.tensor(job["ids"])).logits
    settings = copy.deepcopy(model.generation_config)
    settings.eos_token_id, settings.do_sample, settings.max_new_tokens = None, False, job["new_tokens"]
    prompt = torch.tensor([job["prompt"]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
    results[name] = {
        "class": type(model).__name__,
        "logits": logits,
        "generated": generated[0, prompt.shape[1]:].tolist(),
        "encoded": [tokenizer.encode(text) for text in request["texts"]],
        "decoded": [tokenizer.decode(tokenizer.encode(text)) for text in request["texts"]],
    }
assert not any(m.split(".")[0] in ("lmforge", "pretrain", "data_prep") for m in sys.modules)
torch.save(results, sys.argv[2])
'''


def clean_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """lmforge's greedy decoding by full recompute, over the real vocabulary."""
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_corpus_shards):
    """Trains the four runs, exports each, and runs transformers on every export in one clean subprocess."""
    root = tmp_path_factory.mktemp("export_hf")
    shards = tiny_corpus_shards.shard_dir
    windows = PackedDataset(shards, "valid", 32, seed=0)
    ids = np.stack([windows.window(0)[:32], windows.window(1)[:32]]).tolist()
    prompt = ids[0][:8]
    runs, jobs = {}, {}
    for name, spec in RUNS.items():
        run_dir = root / name
        run_training(run_dir, shards, nproc=spec["nproc"], **{
            "deepspeed.config": f"ds_configs/zero{spec['stage']}.json", "train.max_steps": 40,
            "train.warmup_steps": 4, "train.lr": 0.01, **spec["sets"]})
        out = root / f"{name}-hf"
        export_hf.export(run_dir, out, max_shard_size="100KB" if name == "gpt2-zero3" else "5GB")
        runs[name] = (run_dir, out)
        jobs[name] = {"dir": str(out), "ids": ids, "prompt": prompt, "new_tokens": NEW_TOKENS}
    request = root / "request.json"
    request.write_text(json.dumps({"models": jobs, "texts": HOSTILE_TEXTS}))
    script = root / "hf_side.py"
    script.write_text(HF_SIDE)
    outside = root / "cwd"
    outside.mkdir()
    result = subprocess.run([sys.executable, str(script), str(request), str(root / "hf.pt")], cwd=outside,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    hf = torch.load(root / "hf.pt", weights_only=False)
    return {"runs": runs, "hf": hf, "ids": ids, "prompt": prompt}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_logits_equal_lmforge_logits(exported, name):
    run_dir, out = exported["runs"][name]
    model, config, _ = load_checked_model(run_dir)
    with torch.no_grad():
        ours = model(torch.tensor(exported["ids"]))
    theirs = exported["hf"][name]["logits"]
    expected_class = "LlamaForCausalLM" if config.model.arch == "llama" else "GPT2LMHeadModel"
    assert exported["hf"][name]["class"] == expected_class
    assert theirs.shape == (2, 32, config.model.padded_vocab_size)
    assert ours.shape == (2, 32, config.model.vocab_size)
    assert torch.allclose(theirs[..., : config.model.vocab_size], ours, atol=1e-4, rtol=0)
    assert ours.std() > 0.1  # trained logits, not a blank model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_greedy_generation_of_20_tokens_is_identical(exported, name):
    run_dir, _ = exported["runs"][name]
    model, _, _ = load_checked_model(run_dir)
    ours = greedy(model, exported["prompt"], NEW_TOKENS)
    assert exported["hf"][name]["generated"] == ours
    assert len(ours) == NEW_TOKENS


@pytest.mark.slow
def test_exported_tokenizer_gives_lmforge_ids_and_text_on_hostile_text(exported, tiny_corpus_shards):
    from data_prep.tokenizer import Tokenizer

    ours = Tokenizer.load(tiny_corpus_shards.shard_dir / "tokenizer.model")
    for name in RUNS:
        hf = exported["hf"][name]
        for text, ids, decoded in zip(HOSTILE_TEXTS, hf["encoded"], hf["decoded"]):
            assert ids == ours.encode(text), (name, text)
            assert decoded == text == ours.decode(ids), (name, text)


@pytest.mark.slow
def test_export_writes_transformers_files_and_shards_large_weights(exported):
    _, single = exported["runs"]["llama-zero0"]
    _, sharded = exported["runs"]["gpt2-zero3"]
    assert {p.name for p in single.iterdir()} == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model", ".lmforge-owner.json"}  # the marker: lmforge.ownership
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 1 and all((sharded / f).is_file() for f in shard_files)
    assert "transformer.h.0.attn.c_attn.weight" in index["weight_map"]
    config = json.loads((single / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    gpt2_config = json.loads((exported["runs"]["gpt2-zero0"][1] / "config.json").read_text())
    assert gpt2_config["vocab_size"] == 576 and gpt2_config["activation_function"] == "gelu_new"
    generation = json.loads((exported["runs"]["gpt2-zero0"][1] / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(512, 576)) and generation["eos_token_id"] == 3


def test_tokenizer_files_load_with_auto_tokenizer_and_match_lmforge(tmp_path, tiny_corpus_shards, stdlib_subset):
    from transformers import AutoTokenizer

    from data_prep.tokenizer import Tokenizer
    from run_tools.hf_tokenizer import write_hf_tokenizer

    ours = Tokenizer.load(tiny_corpus_shards.shard_dir / "tokenizer.model")
    write_hf_tokenizer(ours.model_bytes(), tmp_path, 128)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eod_id, ours.pad_id)
    texts = HOSTILE_TEXTS + [p.read_text(encoding="utf-8") for p in stdlib_subset(45)[40:]]  # files it never saw
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text[:80]
        assert theirs.decode(ids) == text


# ----------------------------------------------------------------------------- errors: one line, exit 2

def _broken_copy(exported, name: str, tmp_path: Path) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(exported["runs"][name][0], run_dir)
    return run_dir


def _export_error(capsys, run_dir: Path, out: Path, *extra: str) -> str:
    code = run_cli(export_hf.main, ["--checkpoint", str(run_dir), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists()
    return err


@pytest.mark.slow
def test_cli_reports_a_missing_zero3_shard_in_one_line_without_traceback(exported, tmp_path):
    run_dir = _broken_copy(exported, "llama-zero3", tmp_path)
    (run_dir / "checkpoints" / "step_00000040" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    env = run_env()
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "export-hf", "--checkpoint", str(run_dir),
                             "--output", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step_00000040" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_zero0_model_states_is_a_one_line_error(exported, tmp_path, capsys):
    run_dir = _broken_copy(exported, "gpt2-zero0", tmp_path)
    (run_dir / "checkpoints" / "step_00000040" / "mp_rank_00_model_states.pt").unlink()
    assert "mp_rank_00_model_states.pt: missing" in _export_error(capsys, run_dir, tmp_path / "out")


@pytest.mark.slow
def test_config_vocab_that_disagrees_with_tokenizer_or_weights_is_a_one_line_error(exported, tmp_path, capsys):
    run_dir = _broken_copy(exported, "llama-zero0", tmp_path)
    config_file = run_dir / "config.yaml"
    original = config_file.read_text()
    config_file.write_text(original.replace("vocab_size: 512", "vocab_size: 1000"))
    assert "model.vocab_size = 1000" in _export_error(capsys, run_dir, tmp_path / "out")
    config_file.write_text(original.replace("pad_vocab_to_multiple: 128", "pad_vocab_to_multiple: 1000"))
    err = _export_error(capsys, run_dir, tmp_path / "out")
    assert "embed.weight has shape (512, 32), the config needs (1000, 32)" in err


@pytest.mark.slow
def test_latest_naming_a_missing_tag_or_unknown_step_is_a_one_line_error(exported, tmp_path, capsys):
    run_dir = _broken_copy(exported, "llama-zero0", tmp_path)
    assert "complete steps: 40" in _export_error(capsys, run_dir, tmp_path / "out", "--step", "7")
    (run_dir / "checkpoints" / "latest").write_text("step_00000099")
    assert "names 'step_00000099', which is missing or incomplete" in _export_error(capsys, run_dir, tmp_path / "out")


@pytest.mark.slow
def test_gqa_gpt2_and_a_non_empty_output_are_refused(exported, tmp_path, capsys):
    run_dir = _broken_copy(exported, "gpt2-zero0", tmp_path)
    config_file = run_dir / "config.yaml"
    config_file.write_text(config_file.read_text().replace("n_kv_heads: null", "n_kv_heads: 2"))
    assert "no grouped-query attention" in _export_error(capsys, run_dir, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code = run_cli(export_hf.main, ["--checkpoint", str(exported["runs"]["llama-zero0"][0]), "--output", str(taken)])
    assert code == 2 and "files lmforge did not write (keep.txt)" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"


def test_user_symbols_and_control_symbols_tokenize_as_in_lmforge(tmp_path, stdlib_subset):
    from transformers import AutoTokenizer

    from data_prep.corpus import CorpusSpec
    from data_prep.tokenizer import Tokenizer, TokenizerOptions, train_tokenizer
    from run_tools.hf_tokenizer import write_hf_tokenizer

    spec = CorpusSpec(inputs=tuple(str(p) for p in stdlib_subset(10)))
    # (a symbol holding U+2581 or a space is refused by train_tokenizer: the two would disagree on it)
    options = TokenizerOptions(vocab_size=400, user_symbols=("<|user|>", "<|assistant|>", "x_x"),
                               control_symbols=("<|ctrl|>",))
    ours = Tokenizer.load(train_tokenizer(spec, options, tmp_path / "sp", progress=False))
    write_hf_tokenizer(ours.model_bytes(), tmp_path, 128)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("<|user|> hi\n<|assistant|>  ok<|ctrl|> </s>", "a<|user|>b<|user|><|user|>", "y  x_x   xx x_xx_x"):
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text
    assert theirs("<|ctrl|>")["input_ids"] == ours.encode("<|ctrl|>") != [ours.piece_to_id("<|ctrl|>")]


@pytest.mark.slow
def test_bf16_zero0_checkpoint_exports_its_fp32_master_weights(tmp_path, tiny_corpus_shards):
    """DeepSpeed's bf16 mode with ZeRO-0 saves a bf16 module; the export takes the fp32 masters instead."""
    from safetensors.torch import load_file

    from run_tools.hf_mapping import to_hf
    from run_tools.run_config import load_run_config

    ds_json = tmp_path / "bf16_zero0.json"
    ds_json.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    run_dir = tmp_path / "run"
    run_training(run_dir, tiny_corpus_shards.shard_dir, nproc=1, **{
        "deepspeed.config": str(ds_json), "model.arch": "gpt2", "model.n_kv_heads": "null", "train.max_steps": 4})
    export_hf.export(run_dir, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    states = torch.load(run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    module = to_hf(states["module"], load_run_config(run_dir).model)
    assert sorted(exported) == sorted(module)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor.to(torch.bfloat16), module[name].to(torch.bfloat16)), name  # the masters round to the module
    assert sum(not torch.equal(t, t.to(torch.bfloat16).float()) for t in exported.values()) > len(exported) // 2
