"""train.compile_scope (pretrain.engine.compile_in_place): "blocks" compiles by regions, each block and the LM
head with its loss; "nested" compiles the whole model with each plain block one nested compile region. Both
train as the plain model does."""
import copy
from contextlib import contextmanager

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor

from pretrain.activation_checkpointing import CheckpointedBlock, apply_activation_checkpointing
from pretrain.engine import RegionBlock, compile_in_place
from pretrain.model import Block, ModelConfig, Transformer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def _losses_and_gradients(models, tokens, targets, **inputs):
    """Each model's loss (a forward and backward under bf16 autocast on CUDA, fp32 on the CPU) and gradients."""
    results = []
    for model in models:
        torch.manual_seed(1)  # the same dropout masks where random numbers come from eager (fallback_random)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=tokens.is_cuda):
            loss = model(tokens, targets, **inputs)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    return results


@contextmanager
def _compiled_here(fresh: bool = True):
    """The block's calls compile a graph (not eager after dynamo's recompile limit, reached by earlier tests);
    `fresh`: nothing compiled before is reused."""
    if fresh:
        torch._dynamo.reset()
    counters.clear()
    yield
    assert counters["stats"]["unique_graphs"] >= 1


def _assert_same_training(plain, nested, tokens, targets, fresh: bool = True, **inputs):
    with _compiled_here(fresh):
        (loss, grads), (nested_loss, nested_grads) = _losses_and_gradients((plain, nested), tokens, targets, **inputs)
    bf16 = tokens.is_cuda  # the compiled graph fuses and rounds bf16 differently from eager
    torch.testing.assert_close(nested_loss, loss, rtol=1e-2 if bf16 else 1e-5, atol=1e-6)
    assert set(nested_grads) == set(grads)
    for name, grad in grads.items():
        assert nested_grads[name] is not None, name  # every layer's weights are the region's inputs, not layer 0's
        scale = grad.abs().max().item()
        assert (nested_grads[name] - grad).abs().max().item() <= (2e-2 if bf16 else 1e-4) * scale + 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["gpt2", "llama", "documents", "dropout", "experts"])
def test_nested_scope_trains_with_the_plain_models_loss_and_gradients(case, device):
    """Three layers share one region: with inductor's buffer reuse on (torch 2.13, CPU) the region's reused
    backward gave layer 0's and 1's weights gradients up to 246 away from eager's; NESTED_INDUCTOR_OPTIONS turns
    it off for this compile. A mixture-of-experts block (its router's aux loss is a side effect) stays inline."""
    torch.manual_seed(0)
    shape = dict(vocab_size=100, n_layers=3, n_heads=4, d_model=32, max_seq_len=64)
    config = {
        "gpt2": ModelConfig(arch="gpt2", **shape),
        "llama": ModelConfig(arch="llama", n_kv_heads=2, **shape),
        "documents": ModelConfig(arch="llama", document_attention="sdpa", **shape),
        "dropout": ModelConfig(arch="gpt2", dropout=0.5, **shape),
        "experts": ModelConfig(arch="llama", n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01, d_ff=48, **shape),
    }[case]
    plain = Transformer(config).to(device)
    nested = copy.deepcopy(plain)
    compile_in_place(nested, "nested")
    expected = Block if case == "experts" else RegionBlock
    assert all(type(block) is expected for block in nested.blocks)
    assert list(nested.state_dict()) == list(plain.state_dict())  # checkpoints keep their names

    tokens, targets = torch.randint(0, 100, (2, 2, 24), device=device).unbind(1)
    inputs = {}
    if case == "documents":
        inputs["segment_ids"] = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14], device=device)
    with inductor.patch(fallback_random=case == "dropout"):  # eager's random numbers, so the masks can be compared
        _assert_same_training(plain, nested, tokens, targets, **inputs)
    with torch.no_grad():  # evaluation: the inference graph of the same regions
        plain.eval(), nested.eval()
        torch.testing.assert_close(nested(tokens, targets, **inputs), plain(tokens, targets, **inputs),
                                   rtol=1e-2 if device == "cuda" else 1e-5, atol=1e-6)


@pytest.mark.slow
def test_nested_scope_keeps_activation_checkpointed_blocks_inline():
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(arch="llama", vocab_size=100, n_layers=4, n_heads=4, d_model=32, max_seq_len=64))
    nested = copy.deepcopy(plain)
    assert apply_activation_checkpointing(nested, {"activation_checkpointing": {"number_checkpoints": 2}}) == 2
    compile_in_place(nested, "nested")
    assert [type(block) for block in nested.blocks] == [CheckpointedBlock, RegionBlock, CheckpointedBlock, RegionBlock]
    nested.train()
    _assert_same_training(plain, nested, *torch.randint(0, 100, (2, 2, 24)).unbind(1))


@pytest.mark.slow
def test_nested_scope_takes_a_flex_attention_block_mask_into_its_regions():
    """Packed documents on FlexAttention: the BlockMask built in the graph goes into every region (forward only:
    torch has no FlexAttention backward on the CPU)."""
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=100, n_layers=3, n_heads=4, d_model=32, max_seq_len=256, document_attention="flex")
    plain = Transformer(config).eval()
    nested = copy.deepcopy(plain)
    compile_in_place(nested, "nested")
    tokens, targets = torch.randint(0, 100, (2, 2, 256)).unbind(1)
    segment_ids = torch.tensor([[0] * 100 + [1] * 156, [0] * 50 + [1] * 50 + [2] * 156])
    with torch.no_grad(), _compiled_here():
        torch.testing.assert_close(nested(tokens, targets, segment_ids=segment_ids),
                                   plain(tokens, targets, segment_ids=segment_ids), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nested_scope_compiles_a_new_sequence_length_as_its_own_graph():
    """A second shape would make dynamo trace the length symbolically, and a region's causal flag (`T > 1`) would
    reach scaled_dot_product_attention as a SymBool, which it refuses: the nested scope compiles static shapes."""
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt2", vocab_size=100, n_layers=2, n_heads=4, d_model=32, max_seq_len=64)
    plain = Transformer(config)
    nested = copy.deepcopy(plain)
    compile_in_place(nested, "nested")
    torch._dynamo.reset()
    for length in (24, 16):
        for model in (plain, nested):
            model.zero_grad()
        _assert_same_training(plain, nested, *torch.randint(0, 100, (2, 2, length)).unbind(1), fresh=False)
