"""train.float8: torchao's float8 matmuls in the blocks' linear layers (numerics/float8.py)."""
import sys

import pytest
import torch

from numerics.float8 import convert_to_float8, float8_problems, float8_recipe
from pretrain.model import ModelConfig, Transformer
from tests.pretrain.training_runs import run_training

pytest.importorskip("torchao.float8")  # installed by `make env` (lmforge[fp8]); the checks below need it


def tiny_model(arch: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=4, vocab_size=96, max_seq_len=16))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_blocks_run_in_float8_and_the_head_and_weights_stay_as_they_were(arch):
    from torchao.float8.float8_linear import Float8Linear

    plain, fp8 = tiny_model(arch), tiny_model(arch)
    converted = convert_to_float8(fp8, "tensorwise")
    linears = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    assert converted == len(linears) - 1  # every block linear, not the LM head
    assert not isinstance(fp8.lm_head, Float8Linear)
    assert all(isinstance(fp8.get_submodule(n), Float8Linear) for n in linears if n != "lm_head")
    # The same parameters under the same names: checkpoints, ZeRO and export see no difference.
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in fp8.state_dict().items())
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    exact, quantised = plain(tokens[:, :-1], tokens[:, 1:]), fp8(tokens[:, :-1], tokens[:, 1:])
    assert quantised.item() != exact.item()  # the matmuls really ran in float8
    assert quantised.item() == pytest.approx(exact.item(), rel=2e-2)  # e4m3 rounding, measured ~1e-3
    quantised.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fp8.parameters())


def test_a_missing_torchao_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    assert float8_problems("off", None) == []
    (line,) = float8_problems("tensorwise", None)
    assert line.startswith("train.float8 = 'tensorwise' needs torchao")


def test_auto_is_tensorwise_only_on_a_gpu_of_compute_capability_8_9_or_newer_with_torchao(monkeypatch):
    assert float8_recipe("auto", None) == "off" and float8_recipe("auto", torch.device("cpu")) == "off"
    assert float8_recipe("rowwise", None) == "rowwise" and float8_recipe("off", None) == "off"
    gpu = torch.device("cuda", 0)
    for capability, expected in (((9, 0), "tensorwise"), ((8, 9), "tensorwise"), ((8, 0), "off")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert float8_recipe("auto", gpu) == expected, capability
    assert float8_problems("auto", gpu) == []  # an A100 (8.0) runs bf16: no error for the preset's auto
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    assert float8_recipe("auto", gpu) == "off" and float8_problems("auto", gpu) == []


@pytest.mark.slow
def test_float8_training_follows_the_plain_loss_curve(shards, tmp_path):
    plain = run_training(tmp_path / "plain", shards, **{"deepspeed.config": "ds_configs/zero1.json"})
    fp8 = run_training(tmp_path / "fp8", shards, **{"deepspeed.config": "ds_configs/zero1.json", "train.float8": "tensorwise"})
    assert len(fp8) == len(plain) == 8
    assert fp8 != plain
    assert fp8 == pytest.approx(plain, rel=2e-2)
