"""What one sequence feeds into an engine step (the runner's input unit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SeqChunk:
    token_ids: list[int]  # tokens to run this step: a prefill chunk, or the one token to decode
    start: int  # how many of this sequence's tokens are already in the cache (= position of token_ids[0])
    block_table: list[int]  # block ids holding positions [0, start + len(token_ids)), in order
    adapter: int = -1  # the row's adapter slot in the runner (-1: base model)
    logits: bool = True  # return logits for the chunk's last token (False for a prefill chunk that is not the
    # prompt's last)
