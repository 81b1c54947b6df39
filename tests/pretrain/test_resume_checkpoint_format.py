"""Reads a checkpoint back as docs/formats.md (## Checkpoints) describes it."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pretrain import checkpoint
from tests.pretrain.training_runs import run_training

pytestmark = pytest.mark.slow


def test_a_zero1_checkpoint_folder_is_as_documented(shards, tmp_path):
    run = tmp_path / "run"
    # deepspeed.one_rank_zero0 false: on one rank the tiny preset's ZeRO-1 JSON would run (and save) as ZeRO-0
    run_training(run, shards, **{"train.max_steps": 4, "train.save_interval": 2, "train.keep_last": 1,
                                 "deepspeed.one_rank_zero0": "false"})
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "zero_to_fp32.py", "zero_to_torch.py"]
    folder = root / "step_00000004"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["COMPLETE", "mp_rank_00_model_states.pt", "rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]

    record = json.loads((folder / "COMPLETE").read_text())
    assert set(record) == {"format_version", "tag", "step", "world_size", "data_parallel_size", "zero_stage", "model",
                           "global_batch", "seed", "pipeline_stages", "tensor_parallel", "expert_parallel", "decay_embeddings",
                           "tokenizer_fingerprint", "data", "files", "writer", "blocked_seconds"}
    manifest = json.loads((shards / "manifest.json").read_text())
    assert record["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert record["data"]["content"] == [manifest["corpus"]["sha256"]] and record["data"]["weights"] is None
    assert (record["format_version"], record["tag"], record["step"]) == (1, "step_00000004", 4)
    assert (record["world_size"], record["data_parallel_size"], record["zero_stage"]) == (1, 1, 1)
    assert (record["global_batch"], record["seed"], record["pipeline_stages"], record["decay_embeddings"]) == (2, 1234, 1, False)
    assert record["tensor_parallel"] == 1
    assert record["writer"] == "background" and record["blocked_seconds"] >= 0  # train.checkpoint_writer auto, no offload
    assert record["expert_parallel"] == 1
    assert (record["model"]["n_layers"], record["model"]["d_model"], record["model"]["vocab_size"]) == (2, 32, 512)
    assert sorted(record["files"]) == [n for n in names if n != "COMPLETE"]
    for name, entry in record["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    rng = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= set(rng)
    assert rng["numpy"][0] == "MT19937" and rng["numpy"][1].dtype == torch.int64 and rng["numpy"][1].shape == (624,)
    assert rng["torch"].dtype == torch.uint8

    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)  # DeepSpeed's own pickle
    assert (states["step"], states["seed"], states["world_size"]) == (4, 1234, 1)
    assert (states["global_steps"], states["skipped_steps"], states["dp_world_size"]) == (4, 0, 1)
    assert {"module", "lr_scheduler", "ds_config", "ds_version"} <= set(states)
    weights, tag = checkpoint.consolidated_state_dict(run)
    assert tag == "step_00000004" and torch.equal(weights["embed.weight"], states["module"]["embed.weight"].float())
