"""data.document_masking: a packed sequence computes, for every document in it, what the document would alone
(CPU fp32, 1e-5), and a real run trains with it; off, batches are exactly what they were."""
from __future__ import annotations

import pytest
import torch

from pretrain.model import ModelConfig, Transformer, token_cross_entropy
from pretrain.rank_batches import document_segment_ids

EOD = 2


def test_each_token_belongs_to_the_document_its_eod_ends():
    inputs = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9], [EOD, 4, 4, 4, 4, 4, 4, 4]])
    assert document_segment_ids(inputs, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]


def packed_rows(lengths_per_row: list[list[int]], vocab: int, seed: int) -> torch.Tensor:
    """Rows of documents of the given lengths, each ending with EOD (the last one cut by the row's end)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        docs = [torch.cat([torch.randint(3, vocab, (n - 1,), generator=gen), torch.tensor([EOD])]) for n in lengths]
        rows.append(torch.cat(docs))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_loss_with_document_masking_equals_each_documents_own_loss(arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=64, n_layers=2, n_heads=4, d_model=32, max_seq_len=64,
                         n_kv_heads=2 if arch == "llama" else None, dropout=0.0)
    model = Transformer(config).eval()
    batch = packed_rows([[7, 12, 3, 11], [20, 1, 12]], config.vocab_size, seed=1)  # 33 tokens: 32 inputs + 1 target
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        packed = token_cross_entropy(model.lm_head(model.hidden_states(inputs, segment_ids=document_segment_ids(inputs, EOD))), targets)
        across = token_cross_entropy(model.lm_head(model.hidden_states(inputs)), targets)
        alone = torch.zeros_like(packed)
        for row in range(inputs.shape[0]):
            ends = [i + 1 for i, t in enumerate(inputs[row].tolist()) if t == EOD]
            for start, stop in zip([0] + ends, ends + [inputs.shape[1]]):
                if start < stop:
                    doc = inputs[row : row + 1, start:stop]
                    alone[row, start:stop] = token_cross_entropy(model.lm_head(model.hidden_states(doc)), targets[row : row + 1, start:stop])[0]
        assert (packed - alone).abs().max().item() < 1e-5
        assert abs(packed.mean().item() - alone.mean().item()) < 1e-5
        assert (across - alone).abs().max().item() > 1e-2  # without the option, documents see each other


def test_document_masking_is_refused_with_pipeline_stages_in_one_line():
    from lmforge.errors import LmforgeError
    from pretrain.config import load_pretrain_config

    assert load_pretrain_config("tiny").data.document_masking is False
    assert load_pretrain_config("tiny", ["data.document_masking=true"]).data.document_masking is True
    with pytest.raises(LmforgeError, match="data.document_masking = true: not supported with parallel.pipeline_stages = 2"):
        load_pretrain_config("tiny", ["data.document_masking=true", "parallel.pipeline_stages=2"])


def test_a_run_with_document_masking_trains_on_each_documents_own_loss(tiny_corpus_shards, tmp_path):
    from data_prep.corpus import CorpusSpec
    from data_prep.shards import ShardOptions, build_shards
    from pretrain.rank_batches import TrainingData
    from run_tools.run_config import load_run_config
    from tests.pretrain.training_runs import run_training

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(120):  # short documents: every 64-token window spans several
        (docs / f"doc{i:03d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3))
    shards = tmp_path / "shards"
    build_shards(CorpusSpec(inputs=tuple(str(p) for p in sorted(docs.iterdir()))),
                 tiny_corpus_shards.tokenizer_dir / "tokenizer.model", shards,
                 ShardOptions(valid_fraction=0.1, seed=0, shard_tokens=100_000, workers=1), progress=False)
    run_dir = tmp_path / "run"
    losses = run_training(run_dir, shards, **{"train.max_steps": 1, "train.warmup_steps": 1, "train.seq_len": 64, "train.micro_batch_size": 4,
                                              "data.document_masking": "true", "deepspeed.config": "ds_configs/zero0.json"})
    config = load_run_config(run_dir)
    assert config.data.document_masking is True
    data = TrainingData(config.data, config.train.seq_len, config.train.seed, 0, 1)
    batch = data.train_batch(0, 0, config.train)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    segments = document_segment_ids(inputs, data.document_eod)
    assert (segments[:, -1] >= 1).all()  # every row spans documents
    torch.manual_seed(config.train.seed)  # the run's initial weights: its first step's loss is theirs
    model = Transformer(config.model)
    with torch.no_grad():
        masked = model(inputs, targets, segment_ids=segments).item()
        across = model(inputs, targets).item()
    assert abs(losses[0] - masked) < 1e-4 and abs(across - masked) > 1e-3, (losses[0], masked, across)
