"""Real DeepSpeed runs on 2 CPU ranks (gloo): every ZeRO stage trains the same model the same way."""
import pytest

from tests.pretrain.training_runs import run_training

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_stages_0_to_3_give_the_same_fp32_losses(arch, shards, tmp_path):
    losses = {}
    for stage in (0, 1, 2, 3):
        losses[stage] = run_training(
            tmp_path / f"zero{stage}", shards, nproc=2,
            **{"model.arch": arch, "deepspeed.config": f"ds_configs/zero{stage}.json",
               "model.n_kv_heads": "null" if arch == "gpt2" else 2},
        )
    assert len(losses[0]) == 8
    assert losses[0][-1] < losses[0][0]
    for stage in (1, 2, 3):
        assert losses[stage] == pytest.approx(losses[0], abs=1e-4), f"ZeRO-{stage} diverged from ZeRO-0"
