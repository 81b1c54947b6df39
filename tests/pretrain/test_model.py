"""The model file on its own: shapes, tying, GQA, RoPE, the KV cache and the flops estimate."""
import math

import pytest
import torch

from pretrain.model import ModelConfig, Transformer, flops_per_token
from pretrain.sampling import filter_logits, generate


def tiny(arch: str, **overrides) -> ModelConfig:
    base = dict(arch=arch, vocab_size=100, n_layers=2, n_heads=4, d_model=32, max_seq_len=64)
    if arch == "llama":
        base["n_kv_heads"] = 2
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_cover_the_real_vocab_and_the_table_is_padded(arch):
    model = Transformer(tiny(arch))
    assert model.embed.weight.shape[0] == 128
    logits = model(torch.randint(0, 100, (2, 10)))
    assert logits.shape == (2, 10, 100)


def test_gpt2_ties_embedding_and_head_and_llama_does_not_by_default():
    gpt2 = Transformer(tiny("gpt2"))
    assert gpt2.lm_head.weight.data_ptr() == gpt2.embed.weight.data_ptr()
    llama = Transformer(tiny("llama"))
    assert llama.lm_head.weight.data_ptr() != llama.embed.weight.data_ptr()
    tied_llama = Transformer(tiny("llama", tie_embeddings=True))
    assert tied_llama.lm_head.weight.data_ptr() == tied_llama.embed.weight.data_ptr()


def test_grouped_query_attention_has_fewer_key_value_weights():
    model = Transformer(tiny("llama", n_heads=4, n_kv_heads=1))
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == (8, 32)
    assert attn.v_proj.weight.shape == (8, 32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_is_causal(arch):
    torch.manual_seed(0)
    model = Transformer(tiny(arch)).eval()
    tokens = torch.randint(0, 100, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decoding_matches_full_recompute(arch):
    torch.manual_seed(1)
    model = Transformer(tiny(arch)).eval()
    prompt = torch.randint(0, 100, (2, 5))
    cached = generate(model, prompt, max_new_tokens=12, temperature=0)
    tokens = prompt
    for _ in range(12):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens[:, 5:])


def test_loss_is_cross_entropy_of_the_logits():
    torch.manual_seed(2)
    model = Transformer(tiny("llama")).eval()
    tokens = torch.randint(0, 100, (2, 9))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    padded_logits = model.lm_head(model.hidden_states(tokens[:, :-1]))
    expected = torch.nn.functional.cross_entropy(padded_logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(128), rel=0.05)  # near-uniform at init


def test_residual_projections_get_scaled_init():
    torch.manual_seed(3)
    model = Transformer(tiny("gpt2", n_layers=8, d_model=256, n_heads=4))
    std_out = model.blocks[0].attn.o_proj.weight.std().item()
    std_q = model.blocks[0].attn.q_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_flops_per_token_matches_gpt2_124m_by_hand():
    config = ModelConfig(arch="gpt2", vocab_size=50257, n_layers=12, n_heads=12, d_model=768, max_seq_len=1024)
    n_matmul = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50304
    assert flops_per_token(config, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)[0, 2:]).all()
    probs = logits.softmax(-1)[0]
    kept = filter_logits(logits, top_k=0, top_p=float(probs[0]) + 1e-3)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()


def test_invalid_shapes_are_reported_by_the_config():
    problems = ModelConfig(d_model=30, n_heads=4, n_kv_heads=3).problems()
    assert any("model.d_model = 30" in p for p in problems)
    assert any("model.n_kv_heads = 3" in p for p in problems)


def _left_pad(rows, pad_id=0):
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return tokens, mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padding_with_the_attention_mask_is_inert(arch):
    torch.manual_seed(4)
    model = Transformer(tiny(arch)).eval()
    rows = [torch.randint(0, 100, (n,)).tolist() for n in (9, 4, 1)]
    tokens, mask = _left_pad(rows, pad_id=7)
    padded = model(tokens, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        assert torch.allclose(padded[i, -len(row):], alone, atol=1e-5), (arch, i)
    # Without the mask the padding is read (the case the mask exists for).
    assert not torch.allclose(model(tokens)[1, -4:], model(torch.tensor([rows[1]]))[0], atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_generation_with_the_kv_cache_matches_each_prompt_alone(arch):
    torch.manual_seed(5)
    model = Transformer(tiny(arch)).eval()
    rows = [torch.randint(0, 100, (n,)).tolist() for n in (7, 3)]
    tokens, mask = _left_pad(rows, pad_id=7)
    batched = generate(model, tokens, max_new_tokens=6, temperature=0, prompt_mask=mask)
    for i, row in enumerate(rows):
        assert torch.equal(batched[i], generate(model, torch.tensor([row]), max_new_tokens=6, temperature=0)[0])
    # The cached step's logits equal a full recompute of the unpadded sequence.
    from pretrain.model import KVCache

    cache = KVCache(model.config, 2, tokens.shape[1] + 1, "cpu", torch.float32)
    model(tokens, cache=cache, attention_mask=mask)
    step = model(batched[:, :1], cache=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1))
    for i, row in enumerate(rows):
        full = model(torch.tensor([row + [int(batched[i, 0])]]))[0, -1]
        assert torch.allclose(step[i, -1], full, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_examples_with_segment_ids_give_each_examples_own_logits(arch):
    torch.manual_seed(6)
    model = Transformer(tiny(arch)).eval()
    examples = [torch.randint(0, 100, (n,)).tolist() for n in (5, 3, 6)]
    packed = torch.tensor([sum(examples, [])])
    segments = torch.tensor([[i for i, e in enumerate(examples) for _ in e]])
    logits = model(packed, segment_ids=segments)[0]
    start = 0
    for example in examples:
        alone = model(torch.tensor([example]))[0]
        assert torch.allclose(logits[start : start + len(example)], alone, atol=1e-5)
        start += len(example)
    assert not torch.allclose(model(packed)[0, 5:8], model(torch.tensor([examples[1]]))[0], atol=1e-3)
