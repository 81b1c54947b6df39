"""Supervised fine-tuning: `lmforge sft --set init.from_run=RUN_DIR --set data.train=FILE.jsonl`.

The loss is the cross-entropy of response tokens only (prompt and padding targets are ignored);
with data.packing several examples share a row. Any ZeRO stage through deepspeed.config. Also
runs under torchrun / deepspeed / mpirun / srun like `lmforge train`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lmforge import distributed
from lmforge.errors import LmforgeError, run_cli
from posttrain.batches import EvalChunk, ExampleOrder, eval_chunks, lm_inputs_and_targets, pack, segment_inputs
from posttrain.formats import SFT_SHAPE, parse_sft, split_records
from posttrain.job import Job
from posttrain.losses import sft_loss
from posttrain.template import Rendered, render_sft
from posttrain.verb import SupervisedVerb, run_supervised_verb
from pretrain.model import Transformer, token_cross_entropy


@dataclass(frozen=True)
class SFTData:
    train: list[Rendered]
    valid: list[Rendered]
    dropped: int
    """Examples with no response token left after truncation to train.seq_len."""


def load_sft_data(job: Job) -> SFTData:
    """Reads, checks and renders data.train / data.valid (packing the train rows if asked)."""
    cfg = job.config
    if cfg.data.train is None:
        raise LmforgeError("data.train is required: a JSONL file of " + SFT_SHAPE)
    train, valid = split_records(cfg.data.train, cfg.data.valid, cfg.data.valid_fraction, parse_sft, SFT_SHAPE)

    def render(examples):
        rows = [render_sft(job.tokenizer, ex, cfg.data.max_prompt_len, cfg.train.seq_len) for ex in examples]
        kept = [r for r in rows if any(r.learned[1:])]  # the first id is never a target
        return kept, len(rows) - len(kept)

    train_rows, dropped = render(train)
    valid_rows, dropped_valid = render(valid)
    if not train_rows:
        raise LmforgeError(f"{cfg.data.train}: no example keeps a response token within train.seq_len = "
                           f"{cfg.train.seq_len}; raise train.seq_len or lower data.max_prompt_len")
    if cfg.data.packing:
        order = np.random.default_rng(cfg.train.seed).permutation(len(train_rows))
        train_rows = pack([train_rows[i] for i in order], cfg.train.seq_len)
    return SFTData(train_rows, valid_rows, dropped + dropped_valid)


class SFTStep:
    """The loss of one micro-batch, and the evaluation on the valid rows."""

    def __init__(self, job: Job, engine, data: SFTData, info: distributed.DistributedInfo):
        self.job, self.engine, self.data, self.info = job, engine, data, info
        self.order = ExampleOrder(data.train, job.config.train.seed)

    def _tensors(self, rows: Sequence[Rendered]):
        inputs, targets = lm_inputs_and_targets(rows, self.job.tokenizer.pad_id)
        return inputs.to(self.info.device), targets.to(self.info.device)

    def micro_loss(self, step: int, micro: int):
        t = self.job.config.train
        rows = self.order.micro_batch(step, micro, t.micro_batch_size, t.grad_accum_steps, self.info.rank, self.info.world_size)
        inputs, targets = self._tensors(rows)
        segments = segment_inputs(rows)
        if segments is None:
            logits = self.engine(inputs)
        else:
            logits = self.engine(inputs, segment_ids=segments.to(self.info.device))
        loss = sft_loss(logits, targets)
        return loss, {"response_tokens": (targets != -100).sum().float()}

    def evaluate(self) -> dict[str, float]:
        from posttrain.loop import weighted_mean_over_ranks

        if not self.data.valid:
            return {}
        total, count = torch.zeros((), device=self.info.device), torch.zeros((), device=self.info.device)
        chunk: EvalChunk
        for chunk in eval_chunks(self.data.valid, self.job.config.train.micro_batch_size, self.info.rank, self.info.world_size):
            inputs, targets = self._tensors(chunk.items)
            per_token = token_cross_entropy(self.engine(inputs), targets)
            weights = torch.tensor(chunk.weights, device=self.info.device)[:, None] * (targets != -100).float()
            total += (per_token * weights).sum()
            count += weights.sum()
        return weighted_mean_over_ranks({"loss": total}, count)


def describe(job: Job, data: SFTData) -> str:
    packed = " (packed)" if job.config.data.packing else ""
    return (f"{len(data.train)} train rows{packed}, {len(data.valid)} valid, "
            f"{data.dropped} dropped (no response within train.seq_len)")


SFT = SupervisedVerb("sft", __doc__.splitlines()[0], load_sft_data, Transformer, SFTStep, describe)


def main(argv: Sequence[str] | None = None) -> int:
    return run_supervised_verb(SFT, argv)


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
