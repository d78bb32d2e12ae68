"""Sampling parameters of one served request, and the per-row token choice of the batch scheduler.

Token choice goes through the same sampler as single-request generation (`generation._sampler`), so a
seeded request gives the same reply from the server as from the notebook's `chat`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.generate.generation import GenerationOptions, _sampler


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature == 0` means greedy (argmax), whatever top_p/top_k say."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 turns top-k off; Qwen's own generation configs use 20.
    top_k: int = 0
    # Multiplicative penalty on tokens already in the prompt or the reply (the HF/CTRL definition); 1.0 is off.
    repetition_penalty: float = 1.0
    # Additive OpenAI-style penalties on tokens already in the reply.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # Token ids that end the reply besides the model's end-of-sequence tokens.
    stop_token_ids: tuple[int, ...] = ()
    # Benchmarks need replies of a fixed length; a model's end-of-sequence token would cut them short.
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidOptionError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if math.isnan(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidOptionError(f"temperature must be between 0 and 2 (0 means greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidOptionError(f"top_k must be 0 (off) or positive, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise InvalidOptionError(f"repetition_penalty must be positive, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidOptionError(f"{name} must be between -2 and 2, got {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidOptionError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_sampler(params: SamplingParams, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-request sampler with its own RNG, so a row's samples do not depend on the rest of the batch."""
    return _sampler(GenerationOptions(max_tokens=params.max_tokens, temperature=params.temperature,
                                      top_p=params.top_p, top_k=params.top_k, greedy=params.greedy,
                                      seed=params.seed), device)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor,
                    output_ids: Sequence[int]) -> torch.Tensor:
    """Penalize one row of logits (shape [vocab], modified in place) for tokens seen before."""
    vocab = logits.shape[-1]
    out = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.unique(torch.cat([prompt_ids.to(logits.device), out]))
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if out.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits
