"""model.document_attention: packed documents on FlexAttention compute what the dense-mask path and each
document alone compute (CPU fp32, 1e-5; gradients too), auto picks the kernel meant for the device,
and a compiled model does not recompile when the document layout changes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from numerics.document_attention import dense_document_mask, document_block_mask, document_mask, uses_flex
from pretrain.model import ModelConfig, Transformer, token_cross_entropy
from pretrain.rank_batches import document_segment_ids
from tests.pretrain.test_document_masking import EOD, packed_rows


def tiny(arch: str, document_attention: str) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=64, n_layers=2, n_heads=4, d_model=32, max_seq_len=320,
                       n_kv_heads=2 if arch == "llama" else None, document_attention=document_attention)


def model_pair(arch: str, flex_choice: str = "flex") -> tuple[Transformer, Transformer]:
    """The same weights with document_attention `flex_choice` and sdpa."""
    torch.manual_seed(0)
    flex = Transformer(tiny(arch, flex_choice))
    dense = Transformer(tiny(arch, "sdpa"))
    dense.load_state_dict(flex.state_dict())
    return flex, dense


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 260 inputs (three 128-blocks) whose documents span, fill and cross blocks."""
    batch = packed_rows([[140, 7, 100, 14], [30, 200, 31]], 64, seed=3)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    return inputs, targets, document_segment_ids(inputs, EOD)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    # torch refuses FlexAttention's backward on CPU at a device check; past it, the eager
    # implementation's backward runs (the math the CUDA kernel is tested against by torch).
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_flex_loss_equals_dense_mask_loss_and_each_documents_own_loss(arch):
    flex, dense = model_pair(arch)
    inputs, targets, segments = packed_batch()
    with torch.no_grad():
        on_flex = token_cross_entropy(flex.lm_head(flex.hidden_states(inputs, segment_ids=segments)), targets)
        on_dense = token_cross_entropy(dense.lm_head(dense.hidden_states(inputs, segment_ids=segments)), targets)
        alone = torch.zeros_like(on_flex)
        for row in range(inputs.shape[0]):
            for doc in segments[row].unique().tolist():
                where = (segments[row] == doc).nonzero()[:, 0]
                start, stop = int(where[0]), int(where[-1]) + 1
                hidden = dense.hidden_states(inputs[row : row + 1, start:stop])
                alone[row, start:stop] = token_cross_entropy(dense.lm_head(hidden), targets[row : row + 1, start:stop])[0]
    assert (on_flex - on_dense).abs().max().item() < 1e-5
    assert (on_flex - alone).abs().max().item() < 1e-5
    assert abs(on_flex.mean().item() - alone.mean().item()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_flex_gradients_equal_dense_mask_gradients(arch, flex_backward_on_cpu):
    flex, dense = model_pair(arch)
    inputs, targets, segments = packed_batch()
    flex(inputs, targets, segment_ids=segments).backward()
    dense(inputs, targets, segment_ids=segments).backward()
    dense_grads = dict(dense.named_parameters())
    for name, param in flex.named_parameters():
        scale = dense_grads[name].grad.abs().max().item()
        assert scale > 0, name
        assert (param.grad - dense_grads[name].grad).abs().max().item() < 1e-5 * max(1.0, scale), name


def test_activation_checkpointing_recomputes_flex_blocks_to_the_same_gradients(flex_backward_on_cpu):
    from pretrain.activation_checkpointing import apply_activation_checkpointing

    flex, dense = model_pair("llama")
    assert apply_activation_checkpointing(flex, {"activation_checkpointing": {}}) == 2  # torch's non-reentrant checkpoint
    inputs, targets, segments = packed_batch()
    flex(inputs, targets, segment_ids=segments).backward()
    dense(inputs, targets, segment_ids=segments).backward()
    dense_grads = dict(dense.named_parameters())
    for name, param in flex.named_parameters():
        assert (param.grad - dense_grads[name].grad).abs().max().item() < 1e-5, name


def test_the_block_mask_skips_blocks_across_documents_and_above_the_diagonal():
    # Row 0: documents of 128 and 256 tokens; row 1: one document of 384.
    segments = torch.tensor([[0] * 128 + [1] * 256, [0] * 384])
    blocks = document_block_mask(segments).to_dense()[:, 0].tolist()  # [B, query block, key block]
    assert blocks == [[[1, 0, 0], [0, 1, 0], [0, 1, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
    # The block mask's rule is the dense mask's, token by token.
    rule = document_block_mask(segments).mask_mod
    q, kv = torch.meshgrid(torch.arange(384), torch.arange(384), indexing="ij")
    for b in range(2):
        assert torch.equal(rule(torch.tensor(b), torch.tensor(0), q, kv), dense_document_mask(segments)[b, 0])


def test_auto_takes_flex_on_cuda_without_dropout_and_the_dense_mask_elsewhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_flex("auto", cuda, 0.0) is True
    assert uses_flex("auto", cuda, 0.1) is False  # FlexAttention has no attention dropout
    assert uses_flex("auto", cpu, 0.0) is False  # no FlexAttention backward on CPU
    assert uses_flex("flex", cpu, 0.0) is True and uses_flex("sdpa", cuda, 0.0) is False
    segments = torch.tensor([[0, 0, 1, 1]])
    assert isinstance(document_mask(segments, "auto", 0.0), torch.Tensor)
    assert isinstance(document_mask(segments, "flex", 0.0), flex_module.BlockMask)
    assert ModelConfig().document_attention == "auto"


def test_flex_with_dropout_is_refused_in_one_line():
    from lmforge.errors import LmforgeError
    from pretrain.config import load_pretrain_config

    assert load_pretrain_config("tiny", ["model.document_attention=flex"]).model.document_attention == "flex"
    with pytest.raises(LmforgeError, match="model.document_attention = flex: FlexAttention has no attention dropout"):
        load_pretrain_config("tiny", ["model.document_attention=flex", "model.dropout=0.1"])
    with pytest.raises(LmforgeError, match="model.document_attention"):
        load_pretrain_config("tiny", ["model.document_attention=flash"])


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_a_compiled_flex_model_does_not_recompile_when_the_documents_change(scope, flex_backward_on_cpu):
    import torch._dynamo

    flex, dense = model_pair("llama")
    if scope == "model":
        flex.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    else:
        for block in flex.blocks:
            block.compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts survive reset()
    layouts = [[[0] * 10 + [1] * 22, [0] * 32], [[0] * 3 + [1] * 29, [0] * 16 + [1] * 16],
               [[0] * 5 + [1] * 5 + [2] * 5 + [3] * 17, [0] * 31 + [1]]]
    tokens = torch.randint(0, 64, (3, 2, 33), generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for layout, batch in zip(layouts, tokens):
            segments = torch.tensor(layout)
            loss = flex(batch[:, :-1], batch[:, 1:], segment_ids=segments)
            loss.backward()
            reference = dense(batch[:, :-1], batch[:, 1:], segment_ids=segments)
            assert abs(loss.item() - reference.item()) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled FlexAttention kernel")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_on_cuda_auto_runs_compiled_flex_with_the_dense_mask_loss_and_gradients(arch):
    flex, dense = (m.cuda() for m in model_pair(arch, "auto"))
    inputs, targets, segments = (t.cuda() for t in packed_batch())
    assert isinstance(document_mask(segments, "auto", 0.0), flex_module.BlockMask)
    flex_loss = flex(inputs, targets, segment_ids=segments)
    dense_loss = dense(inputs, targets, segment_ids=segments)
    flex_loss.backward()
    dense_loss.backward()
    assert abs(flex_loss.item() - dense_loss.item()) < 1e-4
    dense_grads = dict(dense.named_parameters())
    for name, param in flex.named_parameters():
        assert torch.allclose(param.grad, dense_grads[name].grad, atol=1e-4, rtol=1e-3), name
