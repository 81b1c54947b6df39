"""import-hf: HF Llama / GPT-2 checkpoints become lmforge runs that compute the same logits, export back
bit for bit, and that `lmforge train` resumes from."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import run_cli
from run_tools import export_hf, import_hf
from run_tools.run_config import load_checked_model
from tests.pretrain.training_runs import REPO, run_env, step_losses

# name -> (model class, config kwargs, tokenizer shipped with it)
SOURCES = {
    # 600 rows for a 512-piece sentencepiece model: a padded vocab that is no multiple of 128
    "llama-gqa-padded": ("llama", dict(vocab_size=600, num_key_value_heads=2, rope_theta=5000.0), "sentencepiece"),
    "llama-tied-bias": ("llama", dict(vocab_size=512, num_key_value_heads=4, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True), "sentencepiece"),
    # tokenizer.json only (no sentencepiece model): copied through unchanged
    "gpt2": ("gpt2", dict(vocab_size=520), "tokenizer.json"),
}


def make_hf_model(kind: str, settings: dict, tokenizer: str, out: Path, tokenizer_model: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from data_prep.tokenizer import Tokenizer
    from run_tools.hf_tokenizer import write_hf_tokenizer

    torch.manual_seed(0)
    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, rms_norm_eps=1e-5, **ids, **settings)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=96, **ids, **settings)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():  # HF zero-initialises biases and norm shifts; random ones test their mapping
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    if tokenizer == "sentencepiece":
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    else:
        write_hf_tokenizer(Tokenizer.load(tokenizer_model).model_bytes(), out, 64)
        (out / "tokenizer.model").unlink()


def import_cli(source: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge.cli", "import-hf", "--model", str(source), "--output", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_corpus_shards):
    """Each source model saved by transformers, imported with the CLI, and exported back."""
    root = tmp_path_factory.mktemp("import_hf")
    out = {}
    for name, (kind, settings, tokenizer) in SOURCES.items():
        source, run_dir, back = root / f"{name}-src", root / f"{name}-run", root / f"{name}-back"
        make_hf_model(kind, settings, tokenizer, source, tiny_corpus_shards.shard_dir / "tokenizer.model")
        result = import_cli(source, run_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "imported" in result.stdout and "lmforge train --config" in result.stdout
        export_hf.export(run_dir, back)
        out[name] = (source, run_dir, back)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SOURCES))
def test_import_then_export_round_trips_weights_exactly(imported, name):
    from safetensors.torch import load_file

    source, _, back = imported[name]
    original, returned = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(returned) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(returned[key], tensor), key
    source_config, back_config = (json.loads((d / "config.json").read_text()) for d in (source, back))
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rope_parameters", "rms_norm_eps", "attention_bias", "mlp_bias", "n_embd", "n_layer",
                "n_head", "n_inner", "n_positions", "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert back_config.get(key) == source_config.get(key), key
    for tokenizer_file in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (source / tokenizer_file).is_file():
            assert (back / tokenizer_file).read_bytes() == (source / tokenizer_file).read_bytes(), tokenizer_file


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SOURCES))
def test_imported_model_computes_the_source_models_logits(imported, name):
    from transformers import AutoModelForCausalLM

    source, run_dir, _ = imported[name]
    ours, config, tag = load_checked_model(run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(source).eval()
    tokens = torch.randint(0, config.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits[..., : config.model.vocab_size]
        assert torch.allclose(ours(tokens), expected, atol=1e-5, rtol=0)
    assert tag == "step_00000000"
    assert config.model.padded_vocab_size == json.loads((source / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_lmforge_train_resumes_from_the_imported_weights(imported, tiny_corpus_shards, tmp_path):
    from pretrain.config import load_pretrain_config
    from pretrain.rank_batches import TrainingData

    _, run_dir, _ = imported["llama-gqa-padded"]
    copy = tmp_path / "continued"
    shutil.copytree(run_dir, copy)
    sets = [f"run.dir={copy}", f"data.path=[{tiny_corpus_shards.shard_dir}]", "train.max_steps=2", "train.warmup_steps=1",
            "train.micro_batch_size=2", "train.seq_len=32", "run.log_interval=1", "run.progress_bar=false",
            "run.tensorboard=false"]
    cmd = [sys.executable, "-m", "pretrain.train", "--config", str(copy / "config.yaml")]
    for item in sets:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout and "at step 0" in result.stdout

    config = load_pretrain_config(copy / "config.yaml", sets)
    batch = TrainingData(config.data, config.train.seq_len, config.train.seed, 0, 1).train_batch(0, 0, config.train)
    model, _, _ = load_checked_model(run_dir)
    with torch.no_grad():
        first_loss = float(model(batch[:, :-1], batch[:, 1:]))
    losses = step_losses(copy)
    assert len(losses) == 2
    assert losses[0] == pytest.approx(first_loss, abs=1e-5)  # step 1 ran on the imported weights, not a fresh init


# ----------------------------------------------------------------------------- errors: one line, exit 2

def _import_error(capsys, source: Path, out: Path, *extra: str) -> str:
    code = run_cli(import_hf.main, ["--model", str(source), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err
    return err


def _edit_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.slow
def test_unsupported_or_damaged_hf_models_are_one_line_errors(imported, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    source = imported["llama-gqa-padded"][0]
    out = tmp_path / "run"
    assert "model_type = 'mistral'" in _import_error(capsys, _edit_config(source, tmp_path / "m", model_type="mistral"), out)
    scaled = _edit_config(source, tmp_path / "r", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    assert "RoPE type 'llama3'" in _import_error(capsys, scaled, out)
    no_weights = _edit_config(source, tmp_path / "w")
    (no_weights / "model.safetensors").unlink()
    assert "no model.safetensors" in _import_error(capsys, no_weights, out)
    partial = _edit_config(source, tmp_path / "p")
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, partial / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight is missing" in _import_error(capsys, partial, out)
    fewer_layers = _edit_config(source, tmp_path / "l", num_hidden_layers=1)
    assert "model.layers.1.input_layernorm.weight" in _import_error(capsys, fewer_layers, out)
    wrong_vocab = _edit_config(source, tmp_path / "v", vocab_size=640)
    assert "embed.weight has shape (600, 32), the config needs (640, 32)" in _import_error(capsys, wrong_vocab, out)
    assert not out.exists()
    assert "comes from the HF config.json" in _import_error(capsys, source, out, "--set", "model.d_model=64")
    assert "already holds checkpoints" in _import_error(capsys, source, imported["gpt2"][1])


@pytest.mark.slow
def test_a_tied_config_over_a_file_with_its_own_head_is_refused_and_the_untied_import_gives_transformers_logits(
        imported, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    source, untied_run, _ = imported["llama-gqa-padded"]  # its own lm_head, different from the embedding
    tied = _edit_config(source, tmp_path / "tied", tie_word_embeddings=True)
    err = _import_error(capsys, tied, tmp_path / "run")
    assert "config.json says tie_word_embeddings = true, but its lm_head.weight differs" in err
    assert not (tmp_path / "run").exists()
    # what transformers computes for that directory: the file's head (it unties), i.e. the untied import's logits
    ours, config, _ = load_checked_model(untied_run)
    theirs = AutoModelForCausalLM.from_pretrained(tied).eval()
    tokens = torch.randint(0, config.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits[..., : config.model.vocab_size], atol=1e-5, rtol=0)
