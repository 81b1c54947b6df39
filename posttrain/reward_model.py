"""Reward model: `lmforge reward --set init.from_run=RUN_DIR --set data.train=PAIRS.jsonl`.

The LM trunk with a scalar head read at each sequence's last real token (the response's closing
EOD), trained with the Bradley–Terry loss -log σ(r_chosen - r_rejected). Logs accuracy (share of
pairs with r_chosen > r_rejected) and margin (mean r_chosen - r_rejected), on train and held-out
pairs. The run directory is what `lmforge ppo --set ppo.reward_run=...` reads.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmforge import distributed
from lmforge.errors import run_cli
from posttrain.batches import ExampleOrder, PairBatch, eval_chunks, pair_batch
from posttrain.heads import ScalarHeadModel, last_token_scores
from posttrain.job import Job
from posttrain.losses import bradley_terry_loss
from posttrain.preferences import PreferenceData, load_preference_data
from posttrain.verb import SupervisedVerb, run_supervised_verb


def pair_scores(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and the rejected rows [B] each (model: engine or ScalarHeadModel)."""
    scores = last_token_scores(model(batch.tokens), batch.lengths)
    return scores[: batch.pairs], scores[batch.pairs :]


class RewardStep:
    def __init__(self, job: Job, engine, data: PreferenceData, info: distributed.DistributedInfo):
        self.job, self.engine, self.data, self.info = job, engine, data, info
        self.order = ExampleOrder(data.train, job.config.train.seed)

    def micro_loss(self, step: int, micro: int):
        t = self.job.config.train
        pairs = self.order.micro_batch(step, micro, t.micro_batch_size, t.grad_accum_steps, self.info.rank, self.info.world_size)
        chosen, rejected = pair_scores(self.engine, pair_batch(pairs, self.job.tokenizer.pad_id).to(self.info.device))
        margin = (chosen - rejected).detach()
        return bradley_terry_loss(chosen, rejected).mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}

    def evaluate(self) -> dict[str, float]:
        from posttrain.loop import weighted_mean_over_ranks

        if not self.data.valid:
            return {}
        device = self.info.device
        sums = {k: torch.zeros((), device=device) for k in ("loss", "accuracy", "margin")}
        weight = torch.zeros((), device=device)
        for chunk in eval_chunks(self.data.valid, self.job.config.train.micro_batch_size, self.info.rank, self.info.world_size):
            chosen, rejected = pair_scores(self.engine, pair_batch(chunk.items, self.job.tokenizer.pad_id).to(device))
            w = torch.tensor(chunk.weights, device=device)
            margin = chosen - rejected
            sums["loss"] += (bradley_terry_loss(chosen, rejected) * w).sum()
            sums["accuracy"] += ((margin > 0).float() * w).sum()
            sums["margin"] += (margin * w).sum()
            weight += w.sum()
        return weighted_mean_over_ranks(sums, weight)


def describe(job: Job, data: PreferenceData) -> str:
    return f"{len(data.train)} train pairs, {len(data.valid)} valid, {data.dropped} dropped"


REWARD = SupervisedVerb("reward", __doc__.splitlines()[0], load_preference_data, ScalarHeadModel, RewardStep, describe)


def main(argv: Sequence[str] | None = None) -> int:
    return run_supervised_verb(REWARD, argv)


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
