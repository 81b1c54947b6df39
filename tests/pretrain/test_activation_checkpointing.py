"""Activation checkpointing applied from outside the model: same names, same state_dict, same gradients."""
from __future__ import annotations

import pickle

import torch

from posttrain.heads import ScalarHeadModel
from pretrain.activation_checkpointing import CheckpointedBlock, apply_activation_checkpointing
from pretrain.model import Block, ModelConfig, Transformer
from pretrain.sampling import generate

CONFIG = ModelConfig(arch="llama", vocab_size=96, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)
ALL_BLOCKS = {"activation_checkpointing": {}}


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIG)


def _grads(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_keeps_names_state_dict_and_gradients():
    plain, wrapped = _model(), _model()
    assert apply_activation_checkpointing(wrapped, ALL_BLOCKS) == CONFIG.n_layers
    assert all(type(b) is CheckpointedBlock for b in wrapped.blocks)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(wrapped.state_dict())  # checkpoints load both ways
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    expected, got = _grads(plain, tokens), _grads(wrapped, tokens)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_number_checkpoints_picks_every_kth_block_and_no_section_undoes_it():
    model = _model()
    assert apply_activation_checkpointing(model, {"activation_checkpointing": {"number_checkpoints": 2}}) == 2
    assert [type(b) is CheckpointedBlock for b in model.blocks] == [True, False, True, False]
    assert apply_activation_checkpointing(model, {}) == 0
    assert all(type(b) is Block for b in model.blocks)
    assert not any(hasattr(b, "recompute") for b in model.blocks)


def test_generation_with_the_kv_cache_is_unchanged_and_the_model_pickles():
    plain, wrapped = _model(), _model()
    apply_activation_checkpointing(wrapped, ALL_BLOCKS)
    prompt = torch.tensor([[3, 5, 7, 11]])
    kwargs = dict(max_new_tokens=6, temperature=0.0)
    assert torch.equal(generate(wrapped.eval(), prompt, **kwargs), generate(plain.eval(), prompt, **kwargs))
    assert type(pickle.loads(pickle.dumps(wrapped)).blocks[0]) is CheckpointedBlock


def test_a_scalar_head_model_checkpoints_its_trunk():
    torch.manual_seed(0)
    model = ScalarHeadModel(CONFIG)
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, ALL_BLOCKS) == CONFIG.n_layers
    assert list(model.state_dict()) == keys
    model.train()
    model(torch.randint(0, CONFIG.vocab_size, (2, 8))).sum().backward()
    assert model.lm.blocks[0].attn.q_proj.weight.grad is not None
