"""How a reply is decoded, and the one sampler every decode loop uses.

`SamplingParams` is the options of one request, whoever sends it: the notebook's `generate` request, the
OpenAI server's requests, the fast decoder and the benchmarks. It checks itself once, on creation, and names a
bad option the way its caller wrote it: the notebook API's camelCase (`topP`) by default, the OpenAI API's
snake_case (`top_p`) through `SamplingParams.from_openai`.

`sample_tokens` is the token choice of all three decode loops (the plain loop in generation.py, the fast
decoder's CUDA-graph step, the batch scheduler's rows), so top-k, top-p and the seeded draw follow one set of
rules and a seeded request gives the same reply on each of them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qwenbook_bridge.engine.errors import InvalidOptionError

MAX_STOP_STRINGS = 16
# Stop-token slots of the fast decoder's device-side end check.
MAX_EOS_IDS = 8

Spelling = Literal["notebook", "openai"]

# How the notebook API (kernel/src/api) names each option; the OpenAI API uses the field names themselves.
_NOTEBOOK_NAMES = {
    "max_tokens": "maxTokens", "top_p": "topP", "top_k": "topK", "repetition_penalty": "repetitionPenalty",
    "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
    "stop_token_ids": "stopTokenIds", "ignore_eos": "ignoreEos",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """The options of one request. Defaults are Qwen2.5-Instruct's generation_config (temperature 0.7, top_p
    0.8, top_k 20); `greedy` or `temperature == 0` takes the most likely token, whatever the rest say."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0 turns top-k off
    greedy: bool = False  # argmax; the sampling settings and the seed are ignored
    # Multiplicative penalty on tokens already in the prompt or the reply (the HF/CTRL definition); 1.0 is off.
    repetition_penalty: float = 1.0
    # Additive OpenAI-style penalties on tokens already in the reply; 0 is off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # cut the reply before the first of these strings
    # Token ids that end the reply besides the model's end-of-sequence tokens.
    stop_token_ids: tuple[int, ...] = ()
    # Benchmarks need replies of a fixed length; a model's end-of-sequence token would cut them short.
    ignore_eos: bool = False
    seed: int | None = None  # fixes sampling for this request only
    # Whose names a refusal uses: "notebook" (maxTokens, topP) or "openai" (max_tokens, top_p).
    spelling: InitVar[Spelling] = "notebook"

    @classmethod
    def from_openai(cls, **options: Any) -> SamplingParams:
        """Options from an OpenAI request body; a refusal names them as that API does (top_p, max_tokens)."""
        return cls(**options, spelling="openai")

    def __post_init__(self, spelling: Spelling) -> None:
        def name(field: str) -> str:
            return _NOTEBOOK_NAMES.get(field, field) if spelling == "notebook" else field

        def refuse(field: str, rule: str) -> InvalidOptionError:
            return InvalidOptionError(f"{name(field)} must be {rule}, got {getattr(self, field)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidOptionError(f"{name('max_tokens')} must be at least 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise refuse("temperature", "a number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise refuse("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise refuse("top_k", "an integer >= 0 (0 turns it off)")
        if not isinstance(self.greedy, bool):
            raise refuse("greedy", "true or false")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise refuse("repetition_penalty", "a number > 0 (1 turns it off)")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not _is_number(value) or not -2 <= value <= 2:
                raise refuse(field, "a number from -2 to 2 (0 turns it off)")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise refuse("stop", "a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidOptionError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, (list, tuple)) \
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise refuse("stop_token_ids", "a list of token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            raise refuse("ignore_eos", "true or false")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise refuse("seed", "an integer that fits in 64 bits")
        # Lists from JSON become tuples, so the options stay hashable and cannot change under a running request.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def is_greedy(self) -> bool:
        """Whether the reply is the argmax at every step (`greedy`, or temperature 0)."""
        return self.greedy or self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# `shortlist` values: every row cuts nothing (top_k 0, top_p 1), so no token needs ranking.
NO_CUT = 0


def filtered_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                   shortlist: int | None = None) -> tuple[Tensor, Tensor]:
    """The distribution each row samples from: (probs, token ids), both [B, N], the tokens most likely first.
    Logits [B, V] are divided by the row's temperature; top-k keeps the k most likely tokens (0 = all); top-p
    then keeps, of those, the smallest prefix whose renormalised probability reaches top_p (the first token
    always stays). What top-p cuts is zeroed, the rest not renormalised again (the draw does not need it).

    With `shortlist` None every row's tokens are sorted (N = V): no host sync and no data-dependent shapes, so
    it runs inside a CUDA graph with per-row settings. A caller that knows its settings on the host may pass
    its top_k as `shortlist` (every row's top_k at most that): then only those N tokens are ranked, which the
    cuts would leave anyway; or NO_CUT when no row cuts anything, and the tokens stay in id order (N = V).
    Sorting a 150k vocabulary for each token costs a CPU tens of milliseconds; the rules do not change."""
    scaled = logits.float() / temperature.clamp_min(1e-5)[:, None]
    vocab = scaled.shape[-1]
    if shortlist == NO_CUT:
        values, ids = scaled, torch.arange(vocab, device=scaled.device).expand_as(scaled)
    elif shortlist is not None and shortlist < vocab:
        values, ids = scaled.topk(shortlist, -1)
    else:
        values, ids = scaled.sort(-1, descending=True)
    rank = torch.arange(values.shape[-1], device=logits.device)[None]
    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = values.masked_fill(beyond_k, -math.inf).softmax(-1)
    # Drop a token once the tokens ranked above it already reach top_p. top_p 1 cuts nothing: a float32
    # cumulative sum may reach 1.0 before the last tokens with any probability.
    beyond_p = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    return probs.masked_fill(beyond_p, 0.0), ids


def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                  generator: torch.Generator | None = None, shortlist: int | None = None) -> Tensor:
    """One token per row of logits [B, V], all on the device (CUDA-graph safe with `shortlist` None). Rows with
    temperature 0 take the argmax; the others draw from `filtered_probs` by the exponential race: argmax(p / E)
    with E ~ Exp(1) picks token i with probability p_i / sum(p), with no normalisation or multinomial call.
    Each row draws one U per vocabulary token, by token id, from `generator` (torch's default generator of the
    device if None): so a shortlist changes which tokens are looked at, never the token drawn."""
    greedy = logits.argmax(-1)
    probs, ids = filtered_probs(logits, temperature, top_k, top_p, shortlist)
    # E = -log(U) for the looked-at tokens only: a uniform draw is several times cheaper than an exponential
    # one on a CPU, and the logarithm is then taken of N values, not V.
    uniform = torch.empty_like(logits, dtype=torch.float32).uniform_(generator=generator)
    picked = uniform if shortlist == NO_CUT else uniform.gather(-1, ids)
    # The clamp keeps U = 1 (E = 0) from turning a masked 0/0 into NaN, which argmax would pick.
    race = probs / picked.log().neg_().clamp_min_(1e-20)
    sampled = ids.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    """A request's own random generator, seeded by its seed (else at random), so its samples do not depend
    on what else the process draws or on the other rows of its batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def sampling_tensors(params: SamplingParams, rows: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """`sample_tokens`' per-row temperature, top_k and top_p for `rows` rows of this request."""
    temperature = 0.0 if params.is_greedy else params.temperature
    # top_k beyond any vocabulary means no cut; capping it keeps a huge value inside int64.
    top_k = min(params.top_k, 2**31)
    return (torch.full((rows,), temperature, dtype=torch.float32, device=device),
            torch.full((rows,), top_k, dtype=torch.long, device=device),
            torch.full((rows,), params.top_p, dtype=torch.float32, device=device))


def make_sampler(params: SamplingParams, device: torch.device) -> Callable[[Tensor], Tensor]:
    """A one-request sampler over logits [V] -> a token id tensor [1], with the request's own generator."""
    if params.is_greedy:
        return lambda logits: logits.argmax(-1, keepdim=True)
    generator = request_generator(params, device)
    temperature, top_k, top_p = sampling_tensors(params, 1, device)
    shortlist = params.top_k if params.top_k > 0 else NO_CUT if params.top_p >= 1 else None

    def sample(logits: Tensor) -> Tensor:
        return sample_tokens(logits.reshape(1, -1), temperature, top_k, top_p, generator, shortlist)

    return sample


def apply_penalties(logits: Tensor, params: SamplingParams, prompt_ids: Tensor,
                    output_ids: Sequence[int]) -> Tensor:
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
