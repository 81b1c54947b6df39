"""The objectives as pure functions: the SFT mask, Bradley–Terry, DPO, GAE, PPO's clipped losses, KL control."""
import math

import pytest
import torch

from posttrain.batches import IGNORE_INDEX, lm_inputs_and_targets, masked_targets, pack
from posttrain.losses import (KLController, RunningMoments, bradley_terry_loss, clipped_policy_loss, clipped_value_loss,
                              dpo_loss, gae, masked_whiten, sequence_logprobs, sft_loss)
from posttrain.template import Rendered
from pretrain.model import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=16, max_seq_len=32)


def rows() -> list[Rendered]:
    return [Rendered([3, 10, 11, 12, 20, 21, 3], [False, False, False, False, True, True, True]),
            Rendered([3, 13, 22, 3], [False, False, True, True])]


def test_sft_loss_is_unchanged_whatever_the_prompt_targets_are():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    inputs, targets = lm_inputs_and_targets(rows(), pad_id=0)
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 20, 21, 3],
                                [IGNORE_INDEX, 22, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    next_ids = torch.tensor([[10, 11, 12, 20, 21, 3], [13, 22, 3, 0, 0, 0]])
    learned = targets != IGNORE_INDEX
    logits = model(inputs)
    loss = sft_loss(logits, masked_targets(next_ids, learned))
    for seed in range(5):  # any ids at the prompt (and padding) positions: the same loss, to the bit
        noise = torch.randint(0, 50, next_ids.shape, generator=torch.Generator().manual_seed(seed))
        scrambled = torch.where(learned, next_ids, noise)
        assert sft_loss(logits, masked_targets(scrambled, learned)).item() == loss.item()
    # Prompt positions' logits get no gradient; a response target does change the loss.
    logits = logits.detach().requires_grad_(True)
    sft_loss(logits, targets).backward()
    assert logits.grad[~learned].abs().sum() == 0
    assert logits.grad[learned].abs().sum() > 0
    changed = next_ids.clone()
    changed[0, 3] = 30
    assert sft_loss(logits, masked_targets(changed, learned)).item() != pytest.approx(loss.item())
    # The mean is over the 5 response tokens, not the 12 positions.
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="sum")
    assert loss.item() == pytest.approx(total.item() / 5, rel=1e-5)


def test_packing_fills_rows_with_whole_examples():
    packed = pack(rows() * 3, seq_len=12)
    assert [len(r) for r in packed] == [11, 11, 11]
    assert packed[0].ids == rows()[0].ids + rows()[1].ids
    assert sum(r.learned.count(True) for r in packed) == 3 * 5


def test_sequence_logprobs_sum_over_learned_tokens_only():
    torch.manual_seed(0)
    tokens = torch.tensor([[3, 10, 11, 20, 21]])
    learned = torch.tensor([[False, False, False, True, True]])
    logits = torch.randn(1, 5, 50)
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 2, 20] + logp[0, 3, 21]
    assert sequence_logprobs(logits, tokens, learned).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bradley_terry_and_dpo_losses_at_known_points():
    assert bradley_terry_loss(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor(5.0), torch.tensor(-5.0)).item() < 1e-4
    same = torch.tensor([-3.0])
    loss, chosen, rejected = dpo_loss(same, same, same, same, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and chosen.item() == rejected.item() == 0
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]),
                                      torch.tensor([-3.0]), beta=0.5)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))


def test_gae_matches_a_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.1
    d1 = 0.0 + gamma * 0.1 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1])


def test_clipped_policy_loss_stops_pushing_past_the_clip():
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.9, 0.5]])).requires_grad_(True)
    loss, clip_fraction, approx_kl = clipped_policy_loss(logp, old, advantages, mask, clip=0.2)
    loss.backward()
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are outside the trust region: no gradient, counted as clipped.
    assert logp.grad[0, 1] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 0] != 0 and logp.grad[0, 2] != 0
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() > 0
    assert loss.item() == pytest.approx(-(1.1 + 1.2 - 0.9 - 0.8) / 4, rel=1e-5)


def test_clipped_value_loss_uses_the_worse_of_clipped_and_unclipped():
    old, returns = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    # v = 2 moved 2 from old; clipped to 0.2 -> error 0.8; unclipped error 1 -> max is 1.
    assert clipped_value_loss(torch.tensor([[2.0]]), old, returns, mask, clip=0.2).item() == pytest.approx(0.5)
    # v = 1 (perfect) but clipped to 0.2 -> the clipped error 0.8 counts.
    assert clipped_value_loss(torch.tensor([[1.0]]), old, returns, mask, clip=0.2).item() == pytest.approx(0.5 * 0.64)


def test_masked_whiten_normalises_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = masked_whiten(x, mask)
    assert out[0, 3] == 0
    assert out[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, :3].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_adaptive_kl_coefficient_moves_toward_the_target_and_fixed_stays():
    fixed = KLController(0.1, None, 100)
    fixed.update(50.0, 10)
    assert fixed.coef == 0.1
    adaptive = KLController(0.1, target=4.0, horizon=100)
    adaptive.update(8.0, 10)  # KL too high: coefficient up by at most 20% × 10/100
    assert adaptive.coef == pytest.approx(0.1 * 1.02)
    adaptive.update(1.0, 10)
    assert adaptive.coef < 0.1 * 1.02


def test_running_moments_match_the_whole_sample():
    moments = RunningMoments(lambda t: t)
    data = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3 + 2
    for chunk in data.split(37):
        moments.update(chunk)
    assert moments.mean == pytest.approx(data.double().mean().item(), rel=1e-9)
    assert moments.std == pytest.approx(data.double().std(unbiased=False).item(), rel=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_sft_loss_equals_the_unpacked_loss(arch):
    from posttrain.batches import segment_inputs
    from posttrain.losses import sft_loss
    from pretrain.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch=arch, vocab_size=40, n_layers=2, n_heads=2, d_model=16, max_seq_len=32)).eval()
    examples = rows() * 2
    packed = pack(examples, seq_len=32)
    assert len(packed) == 1 and packed[0].segments == [1] * 7 + [2] * 4 + [3] * 7 + [4] * 4
    inputs, targets = lm_inputs_and_targets(examples, pad_id=0)
    unpacked = sft_loss(model(inputs), targets)
    inputs, targets = lm_inputs_and_targets(packed, pad_id=0)
    assert torch.allclose(sft_loss(model(inputs, segment_ids=segment_inputs(packed)), targets), unpacked, atol=1e-5, rtol=0)
    assert not torch.allclose(sft_loss(model(inputs), targets), unpacked, atol=1e-4)  # without boundaries it differs
