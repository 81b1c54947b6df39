"""The alignment demo's data: function-prefix prompts from the standard library, completions sampled
from a model, labelled by posttrain.pysyntax, turned into preference pairs; and the valid-rate
measurement on held-out prompts.

Held out means: in the valid split of the pretraining shards (same hash, seed and fraction as
`lmforge prep shards` used, read from the shards' manifest.json), so neither pretraining nor the
preference data saw those files.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmforge.files import write_atomic
from posttrain.pysyntax import FunctionPrompt, completion_is_valid, function_prompts, valid_code_lines
from posttrain.rollout import sample
from posttrain.template import render_prompt


@dataclass(frozen=True)
class PromptSplit:
    train: list[FunctionPrompt]
    held_out: list[FunctionPrompt]


def stdlib_prompt_split(manifest_path: Path, train_count: int, held_out_count: int, seed: int = 0,
                        per_file: int = 6) -> PromptSplit:
    """Prompts from stdlib files pretraining trained on (train) and from its valid split (held out).

    Files are visited in a seeded order, at most `per_file` training prompts each (spread over many
    files; held-out files are few, so all of theirs count), until both lists are full.
    """
    from data_prep.corpus import stdlib_files
    from data_prep.shards import is_valid_document

    from data_prep.manifest import load_manifest

    options = load_manifest(Path(manifest_path).parent).options
    rng = random.Random(seed)
    files = stdlib_files()
    rng.shuffle(files)
    train: list[FunctionPrompt] = []
    held_out: list[FunctionPrompt] = []
    for path in files:
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        held = is_valid_document(data, options["seed"], options["valid_fraction"])
        target, count = (held_out, held_out_count) if held else (train, train_count)
        if len(target) >= count:
            if len(train) >= train_count and len(held_out) >= held_out_count:
                break
            continue
        found = list(function_prompts(path))
        rng.shuffle(found)
        cap = count - len(target) if held else min(per_file, count - len(target))  # held-out files are few
        target.extend(found[:cap])
    return PromptSplit(train, held_out)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], samples_per_prompt: int, max_new_tokens: int,
             temperature: float, seed: int, max_prompt_len: int, batch_size: int = 256) -> list[list[str]]:
    """samples_per_prompt completions (text, EOD stripped) of each prompt, sampled with the KV cache."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    jobs = [(i, render_prompt(tokenizer, p, max_prompt_len)) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        samples = sample(model, model.config, [ids for _, ids in chunk], max_new_tokens, temperature, 0,
                         tokenizer.eod_id, tokenizer.pad_id, generator, device, dtype)
        for (index, _), response in zip(chunk, samples.responses()):
            if response and response[-1] == tokenizer.eod_id:
                response = response[:-1]
            out[index].append(tokenizer.decode(response))
    return out


def preference_pairs(prompts: Sequence[str], completions: Sequence[Sequence[str]], pairs_per_prompt: int,
                     seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"}: a valid completion over an invalid one of the same prompt."""
    rng = random.Random(seed)
    pairs = []
    for prompt, texts in zip(prompts, completions):
        good = [t for t in texts if completion_is_valid(prompt, t)]
        bad = [t for t in texts if not completion_is_valid(prompt, t)]
        for _ in range(min(pairs_per_prompt, len(good), len(bad))):
            pairs.append({"prompt": prompt, "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    return pairs


@dataclass(frozen=True)
class ValidityReport:
    valid_rate: float
    """Share of completions that keep the program valid Python (posttrain.pysyntax)."""
    valid_code_lines: float
    """Mean code lines (not blank, not comments) of the longest valid prefix per completion: more is more real code."""
    mean_chars: float
    completions: int

    def as_dict(self) -> dict:
        return {"valid_rate": self.valid_rate, "valid_code_lines": self.valid_code_lines, "mean_chars": self.mean_chars,
                "completions": self.completions}


def validity(prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> ValidityReport:
    flat = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    n = max(1, len(flat))
    return ValidityReport(
        valid_rate=sum(completion_is_valid(p, c) for p, c in flat) / n,
        valid_code_lines=sum(valid_code_lines(p, c) for p, c in flat) / n,
        mean_chars=sum(len(c) for _, c in flat) / n,
        completions=len(flat),
    )
