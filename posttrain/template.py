"""The chat template: prompts and responses to token ids, with the mask of tokens that are learned.

Pretraining's shards hold documents each followed by EOD, with no BOS, so a document starts right
after an EOD. Every rendered sequence therefore starts with EOD, and:

- raw text (`"prompt": str`):   EOD · prompt · response · EOD
- a conversation (`messages`):  EOD · (BOS · role "\\n" · content · EOD)* ; to answer, BOS "assistant\\n"

BOS opens a turn and EOD closes it (ChatML's <|im_start|>/<|im_end|> with the tokenizer's own
special tokens, so no new embeddings are needed). Learned tokens: the response and its closing EOD
(raw), each assistant turn's content and EOD (conversation). Sampling stops at EOD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from posttrain.formats import Prompt, SFTExample, Turn


class TokenizerLike(Protocol):
    bos_id: int
    eod_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Rendered:
    """Token ids and, per id, whether it is learned (a response token)."""

    ids: list[int]
    learned: list[bool]
    segments: list[int] | None = None
    """Packed rows (posttrain.batches.pack): which example each id belongs to; None for one example."""

    def __len__(self) -> int:
        return len(self.ids)


def _turn(tok: TokenizerLike, turn: Turn) -> list[int]:
    return [tok.bos_id] + tok.encode(f"{turn.role}\n") + tok.encode(turn.content) + [tok.eod_id]


def _assistant_header(tok: TokenizerLike) -> list[int]:
    return [tok.bos_id] + tok.encode("assistant\n")


def render_prompt(tok: TokenizerLike, prompt: Prompt, max_len: int | None = None) -> list[int]:
    """The ids a response continues; longer than max_len keeps the last max_len ids."""
    if isinstance(prompt, str):
        ids = [tok.eod_id] + tok.encode(prompt)
    else:
        ids = [tok.eod_id] + [i for turn in prompt for i in _turn(tok, turn)] + _assistant_header(tok)
    return ids[-max_len:] if max_len is not None and len(ids) > max_len else ids


def render_response(tok: TokenizerLike, response: str) -> list[int]:
    """A response's ids, closed by EOD."""
    return tok.encode(response) + [tok.eod_id]


def render_pair(tok: TokenizerLike, prompt_ids: list[int], response: str, seq_len: int) -> Rendered:
    """prompt_ids + response, cut to seq_len ids; only the response is learned."""
    response_ids = render_response(tok, response)[: max(0, seq_len - len(prompt_ids))]
    return Rendered(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def render_conversation(tok: TokenizerLike, turns: Sequence[Turn], seq_len: int) -> Rendered:
    """A whole conversation, assistant contents (and their EOD) learned, cut to seq_len ids."""
    ids, learned = [tok.eod_id], [False]
    for turn in turns:
        head = [tok.bos_id] + tok.encode(f"{turn.role}\n")
        body = tok.encode(turn.content) + [tok.eod_id]
        ids += head + body
        learned += [False] * len(head) + [turn.role == "assistant"] * len(body)
    return Rendered(ids[:seq_len], learned[:seq_len])


def render_sft(tok: TokenizerLike, example: SFTExample, max_prompt_len: int, seq_len: int) -> Rendered:
    """An SFT example as ids and learned-mask, at most seq_len ids."""
    if example.response is None:
        return render_conversation(tok, example.prompt, seq_len)  # type: ignore[arg-type]
    return render_pair(tok, render_prompt(tok, example.prompt, max_prompt_len), example.response, seq_len)
