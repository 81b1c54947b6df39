"""export-hf of a mixture of experts: an expert-parallel run exports as MixtralForCausalLM whose logits
(transformers alone, no lmforge importable) equal lmforge's; the export imports back to the same weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from run_tools import export_hf
from run_tools.run_config import load_checked_model
from tests.pretrain.training_runs import run_training
from tests.run_tools.test_export_hf import HF_SIDE, clean_env, greedy

pytestmark = pytest.mark.slow
MOE = {"model.n_experts": 4, "model.experts_per_token": 2, "model.d_ff": 48, "train.max_steps": 30,
       "train.lr": 0.01, "train.warmup_steps": 3, "parallel.expert": 2}


@pytest.fixture(scope="module")
def exported_moe(tmp_path_factory, tiny_corpus_shards):
    root = tmp_path_factory.mktemp("export_mixtral")
    run_dir, out = root / "moe", root / "moe-hf"
    run_training(run_dir, tiny_corpus_shards.shard_dir, nproc=2, **MOE)
    export_hf.export(run_dir, out)
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_corpus_shards.vocab_size, (2, 24)).tolist()
    request = root / "request.json"
    request.write_text(json.dumps({"models": {"moe": {"dir": str(out), "ids": ids, "prompt": ids[0][:6], "new_tokens": 12}},
                                   "texts": ["def f(x):\n    return x\n"]}))
    (root / "hf_side.py").write_text(HF_SIDE)
    (root / "cwd").mkdir()
    result = subprocess.run([sys.executable, str(root / "hf_side.py"), str(request), str(root / "hf.pt")], cwd=root / "cwd",
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, out, ids, torch.load(root / "hf.pt", weights_only=False)["moe"]


def test_mixtral_export_logits_and_greedy_text_equal_lmforge(exported_moe):
    run_dir, out, ids, hf = exported_moe
    model, config, _ = load_checked_model(run_dir)
    with torch.no_grad():
        ours = model(torch.tensor(ids))
    assert hf["class"] == "MixtralForCausalLM"
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    torch.testing.assert_close(hf["logits"][..., : config.model.vocab_size], ours, atol=1e-4, rtol=0)
    assert ours.std() > 0.1
    assert hf["generated"] == greedy(model, ids[0][:6], 12)


def test_mixtral_config_and_weights_map_back_to_the_moe_model(exported_moe):
    from safetensors.torch import load_file

    from run_tools.hf_mapping import from_hf, model_config_from_hf

    run_dir, out, _, _ = exported_moe
    model, config, _ = load_checked_model(run_dir)
    back = model_config_from_hf(json.loads((out / "config.json").read_text()), "config.json", config.model.vocab_size)
    assert (back.n_experts, back.experts_per_token) == (4, 2)
    hf_state = {}
    for path in out.glob("*.safetensors"):
        hf_state.update(load_file(path))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf_state
    ours = model.state_dict()
    state = from_hf(hf_state, back, list(ours), "export")
    assert state.keys() == ours.keys()
    assert all(torch.equal(state[k], ours[k]) for k in ours)


def test_import_hf_of_the_mixtral_export_is_a_run_with_the_same_weights(exported_moe, tmp_path):
    from tests.pretrain.training_runs import REPO, run_env

    run_dir, out, _, _ = exported_moe
    model, _, _ = load_checked_model(run_dir)
    # in a process of its own: import-hf opens a process group, whose port must not stay held by pytest's process
    # (and inherited by later tests' ranks through MASTER_PORT)
    cmd = [sys.executable, "-m", "lmforge.cli", "import-hf", "--model", str(out), "--output", str(tmp_path / "imported")]
    done = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported, config, _ = load_checked_model(tmp_path / "imported")
    assert config.model.n_experts == 4
    ours = model.state_dict()
    assert all(torch.equal(imported.state_dict()[k], ours[k]) for k in ours)
