"""train.decay_embeddings: which parameters AdamW decays, in lmforge's engine and in the reference loop."""
from dataclasses import replace

import pytest

from bench.reference_loop import parameter_groups as reference_groups
from lmforge.errors import LmforgeError
from pretrain.config import TrainConfig
from pretrain.engine import parameter_groups
from pretrain.model import ModelConfig, Transformer
from pretrain.resume import check_decay_groups


def named_groups(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups], [g["weight_decay"] for g in groups]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_each_setting_decays_what_it_says(arch, decay_embeddings):
    model = Transformer(ModelConfig(arch=arch, vocab_size=100, n_layers=1, d_model=32, n_heads=4, max_seq_len=16))
    (decayed, exempt), rates = named_groups(model, parameter_groups(model, 0.1, decay_embeddings))
    assert rates == [0.1, 0.0]
    embeddings = ["embed.weight"] + (["pos_embed.weight"] if arch == "gpt2" else [])
    matrices = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n not in embeddings)
    vectors = sorted(n for n, p in model.named_parameters() if p.dim() == 1)  # norms and biases
    assert vectors and all(n not in decayed for n in vectors)
    if decay_embeddings:
        assert decayed == sorted(matrices + embeddings) and exempt == vectors
    else:
        assert decayed == matrices and exempt == sorted(vectors + embeddings)
    # gpt2 ties the head to the embedding: one tensor, listed once, decayed with it or not at all
    assert ("lm_head.weight" in decayed) == (arch == "llama")
    # the reference loop builds the same groups from train.decay_embeddings
    train = replace(TrainConfig(), weight_decay=0.1, decay_embeddings=decay_embeddings)
    assert named_groups(model, reference_groups(model, train)) == ([decayed, exempt], rates)


def test_embeddings_are_exempt_by_default():
    assert TrainConfig().decay_embeddings is False


def test_resuming_with_the_other_setting_is_a_one_line_error_naming_the_key(tmp_path):
    check_decay_groups({}, TrainConfig(), tmp_path)  # a record from before the option: exempt, as the default
    check_decay_groups({"decay_embeddings": True}, TrainConfig(decay_embeddings=True), tmp_path)
    with pytest.raises(LmforgeError, match="written with train.decay_embeddings = false, the config says true"):
        check_decay_groups({}, TrainConfig(decay_embeddings=True), tmp_path)
