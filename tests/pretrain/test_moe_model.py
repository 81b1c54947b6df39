"""The plain-PyTorch mixture of experts (pretrain/model.py MoEMLP): routing, aux loss, active flops."""
import torch
import torch.nn.functional as F

from pretrain.model import MLP, ModelConfig, MoEMLP, Transformer, flops_per_token, load_balancing_loss, matmul_params

MOE = ModelConfig(arch="llama", vocab_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=48,
                  max_seq_len=32, n_experts=4, experts_per_token=2)


def test_moe_block_equals_topk_weighted_sum_of_its_experts():
    torch.manual_seed(0)
    block = MoEMLP(MOE)
    x = torch.randn(2, 5, MOE.d_model)
    out = block(x)
    flat = x.reshape(-1, MOE.d_model)
    probs = F.softmax(block.router(flat), dim=-1)
    expected = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        weights, chosen = probs[n].topk(2)
        weights = weights / weights.sum()
        for w, e in zip(weights, chosen):
            expected[n] += w * block.experts[int(e)](flat[n : n + 1])[0]
    torch.testing.assert_close(out.reshape(-1, MOE.d_model), expected, rtol=1e-5, atol=1e-6)
    assert int(block.expert_load.sum()) == flat.shape[0] * 2


def test_load_balancing_loss_is_k_when_balanced_and_larger_when_one_expert_takes_all():
    n, e = 8, 4
    uniform = torch.full((n, e), 1.0 / e)
    balanced = torch.tensor([[i % e, (i + 1) % e] for i in range(n)])
    loss, counts = load_balancing_loss(uniform, balanced)
    assert abs(float(loss) - 2.0) < 1e-6
    assert counts.tolist() == [4.0, 4.0, 4.0, 4.0]
    skewed = torch.tensor([[0.7, 0.3, 0.0, 0.0]] * n)
    loss, _ = load_balancing_loss(skewed, torch.tensor([[0, 1]] * n))
    assert abs(float(loss) - 4 * (0.7 + 0.3)) < 1e-6


def test_training_loss_adds_router_aux_loss_times_its_coefficient():
    torch.manual_seed(0)
    model = Transformer(MOE)
    tokens = torch.randint(0, 96, (2, 16))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    aux = model.router_aux_loss()
    logits = model.lm_head(model.hidden_states(tokens[:, :-1]))  # padded vocabulary, as the loss
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + 0.01 * aux, rtol=1e-5, atol=1e-6)
    assert 1.0 < float(aux) < 4.0
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_flops_count_active_experts_and_params_report_total_and_active():
    model = Transformer(MOE)
    expert = 3 * 32 * 48
    assert model.num_params() - model.active_params() == 2 * (4 - 2) * expert
    dense = ModelConfig(**{**MOE.__dict__, "n_experts": 0})
    assert matmul_params(MOE) - matmul_params(dense) == 2 * (expert + 32 * 4)
    assert flops_per_token(MOE, 16) == 6 * matmul_params(MOE) + 12 * 2 * 32 * 16


def test_dense_config_builds_plain_mlp_and_its_loss_has_no_aux_term():
    dense = Transformer(ModelConfig(**{**MOE.__dict__, "n_experts": 0}))
    assert all(type(block.mlp) is MLP for block in dense.blocks)
    assert dense.active_params() == dense.num_params()


def test_bad_moe_fields_are_named_in_problems():
    problems = ModelConfig(n_experts=4, experts_per_token=5).problems() + ModelConfig(arch="gpt2", n_experts=1).problems()
    text = "\n".join(problems)
    assert "model.experts_per_token = 5" in text and "model.n_experts = 1" in text


def test_activation_checkpointed_moe_blocks_give_the_same_router_gradients():
    from functools import partial

    import torch.utils.checkpoint

    from pretrain.activation_checkpointing import CheckpointedBlock

    torch.manual_seed(0)
    plain, checkpointed = Transformer(MOE), Transformer(MOE)
    checkpointed.load_state_dict(plain.state_dict())
    for block in checkpointed.blocks:
        block.__class__ = CheckpointedBlock
        block.recompute = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    tokens = torch.randint(0, 96, (2, 16))
    for model in (plain, checkpointed):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    for a, b in zip(plain.blocks, checkpointed.blocks):
        torch.testing.assert_close(b.mlp.router.weight.grad, a.mlp.router.weight.grad, rtol=1e-5, atol=1e-7)
