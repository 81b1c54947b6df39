"""Real DeepSpeed AutoTP runs on CPU ranks (gloo, fp32, ZeRO-1): tensor parallelism trains the same model."""
import pytest

from tests.pretrain.training_runs import run_training

pytestmark = pytest.mark.slow

STEPS = 20


def _losses(tmp_path_factory, shards, name: str, arch: str, nproc: int, tensor: int) -> list[float]:
    return run_training(
        tmp_path_factory.mktemp(name), shards, nproc=nproc,
        **{"model.arch": arch, "model.n_kv_heads": "null" if arch == "gpt2" else 2, "parallel.tensor": tensor,
           "train.max_steps": STEPS, "deepspeed.config": "ds_configs/zero1.json"},
    )


@pytest.fixture(scope="module")
def single_rank_losses(tmp_path_factory, shards):
    return {arch: _losses(tmp_path_factory, shards, f"single-{arch}", arch, 1, 1) for arch in ("llama", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tensor_parallel_2_matches_single_rank_losses(arch, single_rank_losses, tmp_path_factory, shards):
    reference = single_rank_losses[arch]
    losses = _losses(tmp_path_factory, shards, f"tp2-{arch}", arch, 2, 2)
    assert len(reference) == STEPS and reference[-1] < reference[0]
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tensor_2_by_data_2_matches_single_rank_losses_at_the_same_global_batch(arch, single_rank_losses,
                                                                                tmp_path_factory, shards):
    # 4 ranks = 2 tensor × 2 data; micro 1 × 2 replicas is the single rank's global batch of 2.
    reference = single_rank_losses[arch]
    losses = run_training(
        tmp_path_factory.mktemp(f"tp2dp2-{arch}"), shards, nproc=4,
        **{"model.arch": arch, "model.n_kv_heads": "null" if arch == "gpt2" else 2, "parallel.tensor": 2,
           "train.max_steps": STEPS, "train.micro_batch_size": 1, "deepspeed.config": "ds_configs/zero2.json"},
    )
    assert losses == pytest.approx(reference, rel=1e-5)
