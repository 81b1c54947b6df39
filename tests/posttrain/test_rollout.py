"""Rollouts without DeepSpeed: EOD left-padding, stopping at EOD, and the alignment of per-token quantities."""
import pytest
import torch

from lmforge.errors import LmforgeError
from posttrain.heads import ScalarHeadModel, last_token_scores
from posttrain.losses import token_logprobs
from posttrain.reward_functions import digit_fraction, resolve_reward_function
from posttrain.rollout import make_experience, reward_model_inputs, sample
from pretrain.model import ModelConfig, Transformer

EOD, PAD = 3, 0
CONFIG = ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, max_seq_len=64)


def tiny_models():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval(), ScalarHeadModel(CONFIG).eval()


def test_sample_left_pads_with_eod_and_stops_rows_at_their_eod():
    actor, _ = tiny_models()
    with torch.no_grad():
        actor.lm_head.weight[EOD] += 0.3  # make EOD likely enough to end some rows early
    prompts = [[EOD, 10, 11, 12], [EOD, 13]]
    samples = sample(actor, CONFIG, prompts, 12, 1.0, 0, EOD, PAD, torch.Generator().manual_seed(1),
                     torch.device("cpu"), torch.float32)
    assert samples.prompt_width == 4
    assert samples.sequences[1, :4].tolist() == [EOD, EOD, EOD, 13]
    assert samples.prompts() == prompts
    for row, n, response in zip(samples.sequences.tolist(), samples.lengths.tolist(), samples.responses()):
        assert response == row[4 : 4 + n]
        if EOD in response:
            assert response.index(EOD) == n - 1  # a row ends with its first EOD...
        assert all(t == PAD for t in row[4 + n :])  # ...and is padding after it
    assert samples.response_mask.sum().item() == samples.lengths.sum().item()


def test_sampled_rows_equal_one_at_a_time_sampling_with_the_same_generator_state():
    actor, _ = tiny_models()
    prompt = [[EOD, 5, 6, 7]]
    a = sample(actor, CONFIG, prompt, 8, 1.0, 0, EOD, PAD, torch.Generator().manual_seed(3), torch.device("cpu"), torch.float32)
    b = sample(actor, CONFIG, prompt, 8, 1.0, 0, EOD, PAD, torch.Generator().manual_seed(3), torch.device("cpu"), torch.float32)
    assert torch.equal(a.sequences, b.sequences)
    top1 = sample(actor, CONFIG, prompt, 8, 1.0, 1, EOD, PAD, torch.Generator().manual_seed(3), torch.device("cpu"), torch.float32)
    with torch.no_grad():  # top_k = 1 is greedy decoding
        seq = torch.tensor(prompt)
        for _ in range(top1.lengths.item()):
            seq = torch.cat([seq, actor(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert top1.sequences[0, : seq.shape[1]].tolist() == seq[0].tolist()


def test_experience_aligns_logprobs_values_and_rewards_with_response_tokens():
    actor, critic = tiny_models()
    reference = Transformer(CONFIG).eval()
    samples = sample(actor, CONFIG, [[EOD, 10, 11], [EOD, 12]], 6, 1.0, 0, EOD, PAD,
                     torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    scores = torch.tensor([1.0, -2.0])
    exp = make_experience(samples, actor, critic, reference, lambda s: scores, lambda s: s, kl_coef=0.1,
                          temperature=1.0, gamma=1.0, lam=1.0)
    for row, (prompt, response) in enumerate(zip(samples.prompts(), samples.responses())):
        alone = torch.tensor([prompt + response])  # the row without its left padding: the mask makes it identical
        with torch.no_grad():
            logp = torch.log_softmax(actor(alone), -1)[0]
            ref = torch.log_softmax(reference(alone), -1)[0]
        for j, token in enumerate(response):
            at = len(prompt) - 1 + j
            assert exp.old_logprobs[row, j].item() == pytest.approx(logp[at, token].item(), abs=1e-5)
            assert exp.ref_logprobs[row, j].item() == pytest.approx(ref[at, token].item(), abs=1e-5)
    # γ = λ = 1: the return of the first response token is the score minus the whole KL penalty.
    assert exp.returns[:, 0].tolist() == pytest.approx((scores - 0.1 * exp.kl).tolist(), abs=1e-5)
    assert exp.kl.tolist() == pytest.approx(((exp.old_logprobs - exp.ref_logprobs) * exp.mask).sum(-1).tolist())
    assert (exp.advantages[~exp.mask] == 0).all()


def test_reward_model_reads_the_prompt_and_response_without_left_padding():
    _, critic = tiny_models()
    samples = sample(Transformer(CONFIG).eval(), CONFIG, [[EOD, 10, 11], [EOD, 12]], 5, 1.0, 0, EOD, PAD,
                     torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    tokens, lengths = reward_model_inputs(samples, EOD, PAD)
    for row, (prompt, response) in enumerate(zip(samples.prompts(), samples.responses())):
        expected = prompt + response + ([] if response[-1:] == [EOD] else [EOD])
        assert tokens[row, : lengths[row]].tolist() == expected
    values = torch.arange(tokens.numel(), dtype=torch.float32).view(tokens.shape)
    assert last_token_scores(values, lengths).tolist() == [values[i, lengths[i] - 1].item() for i in range(2)]


def test_reward_functions_resolve_by_name_or_module_path():
    assert digit_fraction(["p", "p", "p"], ["12 ab", "", "x"]) == [0.5, 0.0, 0.0]
    assert resolve_reward_function("digit_fraction") is digit_fraction
    assert resolve_reward_function("posttrain.reward_functions:digit_fraction") is digit_fraction
    with pytest.raises(LmforgeError, match="ppo.reward_function = 'nope'"):
        resolve_reward_function("nope")
    with pytest.raises(LmforgeError, match="cannot import"):
        resolve_reward_function("posttrain.reward_functions:nope")


def test_token_logprobs_divide_by_the_sampling_temperature():
    logits = torch.randn(1, 3, 40, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 2, 3]])
    expected = torch.log_softmax(logits[0, 0] / 0.5, -1)[2]
    assert token_logprobs(logits, tokens, 0.5)[0, 0].item() == pytest.approx(expected.item(), abs=1e-5)
