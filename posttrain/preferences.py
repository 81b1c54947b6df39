"""Preference pairs (`{"prompt", "chosen", "rejected"}` JSONL) rendered for the reward model and DPO."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from posttrain.formats import PREFERENCE_SHAPE, PreferencePair, parse_preference, split_records
from posttrain.job import Job
from posttrain.template import Rendered, render_pair, render_prompt

RenderedPair = tuple[Rendered, Rendered]
"""(prompt + chosen, prompt + rejected), the responses learned."""


@dataclass(frozen=True)
class PreferenceData:
    train: list[RenderedPair]
    valid: list[RenderedPair]
    dropped: int
    """Pairs where a response kept no token within train.seq_len."""


def render_preference(job: Job, pair: PreferencePair) -> RenderedPair:
    cfg = job.config
    prompt_ids = render_prompt(job.tokenizer, pair.prompt, cfg.data.max_prompt_len)
    return (render_pair(job.tokenizer, prompt_ids, pair.chosen, cfg.train.seq_len),
            render_pair(job.tokenizer, prompt_ids, pair.rejected, cfg.train.seq_len))


def load_preference_data(job: Job) -> PreferenceData:
    """Reads and checks data.train / data.valid; every pair is rendered with the chat template."""
    cfg = job.config
    if cfg.data.train is None:
        raise LmforgeError("data.train is required: a JSONL file of " + PREFERENCE_SHAPE)
    train, valid = split_records(cfg.data.train, cfg.data.valid, cfg.data.valid_fraction, parse_preference, PREFERENCE_SHAPE)
    if train and all(p.chosen == p.rejected for p in train):  # the loss would sit at ln 2, learning nothing
        raise LmforgeError(f"{cfg.data.train}: \"chosen\" equals \"rejected\" in every one of its {len(train)} train pairs; "
                           "a preference needs two different responses")

    def render(pairs):
        rendered = [render_preference(job, p) for p in pairs]
        kept = [(c, r) for c, r in rendered if any(c.learned) and any(r.learned)]
        return kept, len(rendered) - len(kept)

    train_pairs, dropped = render(train)
    valid_pairs, dropped_valid = render(valid)
    if not train_pairs:
        raise LmforgeError(f"{cfg.data.train}: no pair keeps response tokens within train.seq_len = {cfg.train.seq_len}")
    return PreferenceData(train_pairs, valid_pairs, dropped + dropped_valid)
