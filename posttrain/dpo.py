"""Direct preference optimisation: `lmforge dpo --set init.from_run=RUN_DIR --set data.train=PAIRS.jsonl`.

The policy starts from init.from_run; a frozen copy of it is the reference. Loss (Rafailov et al.
2023): -log σ(β[(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]) over the response
tokens. Logged: the implicit rewards β·log(π/π_ref) of chosen and rejected responses, their margin,
and the implicit-reward accuracy (share of pairs whose chosen reward is higher), on train and valid.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmforge import distributed
from lmforge.errors import run_cli
from posttrain.batches import ExampleOrder, PairBatch, eval_chunks, pair_batch
from posttrain.job import Job, build_initial
from posttrain.losses import dpo_loss, sequence_logprobs
from posttrain.preferences import PreferenceData, load_preference_data
from posttrain.verb import SupervisedVerb, run_supervised_verb
from pretrain.model import Transformer


class DPOStep:
    def __init__(self, job: Job, engine, reference, data: PreferenceData, info: distributed.DistributedInfo):
        self.job, self.engine, self.reference, self.data, self.info = job, engine, reference, data, info
        self.order = ExampleOrder(data.train, job.config.train.seed)

    def _losses(self, batch: PairBatch):
        logp = sequence_logprobs(self.engine(batch.tokens), batch.tokens, batch.learned)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference(batch.tokens), batch.tokens, batch.learned)
        n = batch.pairs
        dpo = self.job.config.dpo
        return dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], dpo.beta, dpo.label_smoothing)

    def micro_loss(self, step: int, micro: int):
        t = self.job.config.train
        pairs = self.order.micro_batch(step, micro, t.micro_batch_size, t.grad_accum_steps, self.info.rank, self.info.world_size)
        loss, chosen, rejected = self._losses(pair_batch(pairs, self.job.tokenizer.pad_id).to(self.info.device))
        margin = chosen - rejected
        return loss.mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                             "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}

    def evaluate(self) -> dict[str, float]:
        from posttrain.loop import weighted_mean_over_ranks

        if not self.data.valid:
            return {}
        device = self.info.device
        sums = {k: torch.zeros((), device=device) for k in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")}
        weight = torch.zeros((), device=device)
        for chunk in eval_chunks(self.data.valid, self.job.config.train.micro_batch_size, self.info.rank, self.info.world_size):
            loss, chosen, rejected = self._losses(pair_batch(chunk.items, self.job.tokenizer.pad_id).to(device))
            w = torch.tensor(chunk.weights, device=device)
            for key, value in (("loss", loss), ("accuracy", (chosen > rejected).float()), ("margin", chosen - rejected),
                               ("chosen_reward", chosen), ("rejected_reward", rejected)):
                sums[key] += (value * w).sum()
            weight += w.sum()
        return weighted_mean_over_ranks(sums, weight)


def make_step(job: Job, engine, data: PreferenceData, info: distributed.DistributedInfo) -> DPOStep:
    """The step, with the frozen reference: the same starting weights as the policy."""
    from posttrain.frozen_models import build_frozen

    reference = build_frozen(build_initial(job.config, Transformer), job.ds_config, job.config.dpo.reference, info.device)
    return DPOStep(job, engine, reference, data, info)


def describe(job: Job, data: PreferenceData) -> str:
    return f"{len(data.train)} train pairs, {len(data.valid)} valid, {data.dropped} dropped, beta {job.config.dpo.beta}"


DPO = SupervisedVerb("dpo", __doc__.splitlines()[0], load_preference_data, Transformer, make_step, describe)


def main(argv: Sequence[str] | None = None) -> int:
    return run_supervised_verb(DPO, argv)


if __name__ == "__main__":
    distributed.exit_process(run_cli(main))
