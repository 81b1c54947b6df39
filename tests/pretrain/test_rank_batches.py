"""pretrain.rank_batches: each rank's train and valid batches are the rows of their global indices."""
import numpy as np
import torch

from pretrain.config import DataConfig, TrainConfig
from pretrain.rank_batches import TrainingData
from tests.data_prep.test_packed_dataset import SEQ_LEN, per_sample


def test_train_and_valid_batches_are_the_rows_of_their_global_indices(tiny_corpus_shards):
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=2, seq_len=SEQ_LEN)
    data = TrainingData(DataConfig(path=(tiny_corpus_shards.shard_dir,)), SEQ_LEN, seed=6, rank=1, world_size=2)
    for step, micro in [(0, 0), (0, 1), (500, 1)]:
        batch = data.train_batch(step, micro, train)
        first = step * 16 + micro * 8 + 4  # global batch 4 x 2 x 2; rank 1 reads the second 4 of each 8
        assert batch.dtype == torch.int64 and np.array_equal(batch.numpy(), per_sample(data.train, first, 4))
    assert np.array_equal(data.valid_batch(3, train).numpy(), per_sample(data.valid, 3 * 8 + 4, 4))
