"""train.compile_scope (pretrain.engine.compile_in_place): "blocks" compiles by regions, each block and the LM
head with its loss, and trains as the plain model does."""
import copy

import pytest
import torch

from pretrain.engine import compile_in_place
from pretrain.model import ModelConfig, Transformer


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 16])
def test_blocks_scope_compiles_the_head_and_loss_region_with_the_plain_models_loss_and_gradients(chunk):
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt2", vocab_size=100, n_layers=2, n_heads=4, d_model=32, max_seq_len=64,
                         loss_chunk_tokens=chunk)
    plain = Transformer(config)
    regions = copy.deepcopy(plain)
    compile_in_place(regions, "blocks")
    assert hasattr(regions.head_loss, "_torchdynamo_orig_callable")  # the head and loss are their own compiled region
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None for block in regions.blocks)
    assert list(regions.state_dict()) == list(plain.state_dict())  # checkpoints keep their names

    tokens, targets = torch.randint(0, 100, (2, 3, 24)).unbind(1)[:2]
    losses = []
    for model in (plain, regions):
        loss = model(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), regions.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
