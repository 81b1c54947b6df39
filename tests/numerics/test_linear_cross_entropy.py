"""model.loss_chunk_tokens: the LM head + cross-entropy in chunks (numerics/linear_cross_entropy.py)."""
from dataclasses import replace

import pytest
import torch

from pretrain.model import ModelConfig, Transformer


def models(arch: str, chunk: int) -> tuple[Transformer, Transformer]:
    config = ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if arch == "llama" else None,
                         vocab_size=200, max_seq_len=32)
    torch.manual_seed(0)
    plain = Transformer(config)
    chunked = Transformer(replace(config, loss_chunk_tokens=chunk))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [7, 64, 4096])  # uneven chunks, the whole batch in one
def test_chunked_head_gives_the_plain_loss_and_gradients(arch, chunk):
    plain, chunked = models(arch, chunk)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 200, (3, 21), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # ignored tokens count in the mean as zeros, as the plain loss does
    losses = []
    for model in (plain, chunked):
        loss = model(tokens[:, :-1], targets)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        losses.append(loss)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        # fp32 rounding of sums over tokens: 1e-5 of each gradient's largest entry
        assert (q.grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9, name


def test_chunked_head_under_bf16_autocast_stays_close():
    plain, chunked = models("llama", 16)
    tokens = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = plain(tokens[:, :-1], tokens[:, 1:])
        b = chunked(tokens[:, :-1], tokens[:, 1:])
    a.backward()
    b.backward()
    assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=1e-2)
    assert torch.allclose(chunked.lm_head.weight.grad, plain.lm_head.weight.grad, rtol=5e-2, atol=1e-3)


def test_a_negative_chunk_is_one_line_naming_the_key():
    (line,) = ModelConfig(loss_chunk_tokens=-1).problems()
    assert line.startswith("model.loss_chunk_tokens = -1: must be 0")


def test_chunked_head_compiles_in_one_graph():
    plain, chunked = models("llama", 16)
    tokens = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(2))
    reference = plain(tokens[:, :-1], tokens[:, 1:])
    reference.backward()
    compiled = torch.compile(chunked, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(chunked.lm_head.weight.grad, plain.lm_head.weight.grad, atol=1e-6)
