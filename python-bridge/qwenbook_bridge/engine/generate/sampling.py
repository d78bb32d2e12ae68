"""How a reply is decoded, and the one sampler every decode loop uses.

`SamplingParams` is the options of one request, whoever sends it: the notebook's `generate` request, the
OpenAI server's requests, the fast decoder and the benchmarks. It checks itself once, on creation, and names a
bad option the way its caller wrote it: the notebook API's camelCase (`topP`) by default, the OpenAI API's
snake_case (`top_p`) through `SamplingParams.from_openai`.

`sample_rows` is the token choice of every decode loop (the plain loop in generation.py through `make_sampler`,
the fast decoder's CUDA-graph step through `sample_tokens`, the batch engines' rows through `sample_batch`), so
top-k, top-p, min-p and the seeded draw follow one set of rules and a seeded request gives the same reply on each.

The draw needs no random generator: the uniform number a row races token `t` with is a hash of (the request's
seed, how many tokens the row has drawn, t), computed with integer tensor ops on the device (`hash_uniforms`).
So a batch of rows, each with its own seed, draws in one call; the tokens a shortlist leaves out change nothing;
and CPU and CUDA draw the same numbers.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
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
    "stop_token_ids": "stopTokenIds", "ignore_eos": "ignoreEos", "min_p": "minP",
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
    # Drop tokens less likely than min_p times the most likely one (after temperature); 0 turns it off.
    min_p: float = 0.0
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
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise refuse("min_p", "in [0, 1] (0 turns it off)")
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
        object.__setattr__(self, "min_p", float(self.min_p))

    @property
    def is_greedy(self) -> bool:
        """Whether the reply is the argmax at every step (`greedy`, or temperature 0)."""
        return self.greedy or self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# `shortlist` values: no row cuts by rank (top_k 0, top_p 1), so no token needs ranking.
NO_CUT = 0


def filtered_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                   shortlist: int | None = None, min_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The distribution each row samples from: (probs, token ids), both [B, N], the tokens most likely first.
    Logits [B, V] are divided by the row's temperature; top-k keeps the k most likely tokens (0 = all); top-p
    then keeps, of those, the smallest prefix whose renormalised probability reaches top_p (the first token
    always stays); min-p then drops the tokens less likely than min_p times the most likely one. What top-p or
    min-p cut is zeroed, the rest not renormalised again (the draw does not need it).

    With `shortlist` None every row's tokens are sorted (N = V): no host sync and no data-dependent shapes, so
    it runs inside a CUDA graph with per-row settings. A caller that knows its settings on the host may pass
    its top_k as `shortlist` (every row's top_k at most that): then only those N tokens are ranked, which the
    cuts would leave anyway; or NO_CUT when no row cuts by rank (min-p needs no ranking), and the tokens stay
    in id order (N = V). Sorting a 150k vocabulary costs a CPU tens of milliseconds; the rules do not change."""
    divisor = temperature.clamp_min(1e-5)[:, None]
    vocab = logits.shape[-1]
    if shortlist == NO_CUT:
        values = logits.float() / divisor
        ids = torch.arange(vocab, device=logits.device).expand_as(values)
    elif shortlist is not None and shortlist < vocab:
        # A positive divisor keeps the order, so rank first and scale only the N kept values (not all V).
        values, ids = logits.topk(shortlist, -1)
        values = values.float() / divisor
    else:
        values, ids = (logits.float() / divisor).sort(-1, descending=True)
    rank = torch.arange(values.shape[-1], device=logits.device)[None]
    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = values.masked_fill(beyond_k, -math.inf).softmax(-1)
    # Drop a token once the tokens ranked above it already reach top_p. top_p 1 cuts nothing: a float32
    # cumulative sum may reach 1.0 before the last tokens with any probability.
    beyond_p = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    probs = probs.masked_fill(beyond_p, 0.0)
    if min_p is not None:
        # Top-k and top-p always keep the most likely token, and renormalising what they keep changes no
        # token's ratio to it: so this is transformers' order (top-k, top-p, min-p) and vLLM's rule alike.
        # The max, not the first column, because NO_CUT leaves the tokens in id order.
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs, ids


# ---- the seeded draw: a counter-based hash, so rows need no generator of their own -------------------------

def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 that torch stores for it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants: the increment (2^64 over the golden ratio) and the finalizer's two multipliers.
_GAMMA = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _mix_(z: Tensor) -> Tensor:
    """splitmix64's finalizer over int64 [any shape], in place on `z` (which the caller owns). int64
    multiplication wraps like uint64's; `>>` on int64 copies the sign bit, so each shift is masked to its
    low 64 - s bits to make it the logical shift the finalizer means."""
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=shifted)
        z.bitwise_xor_(shifted.bitwise_and_((1 << (64 - bits)) - 1))
        if multiplier is not None:
            z.mul_(multiplier)
    return z


def hash_uniforms(seed: Tensor, step: Tensor, token_ids: Tensor) -> Tensor:
    """The uniform number in (0, 1) each row races each of its tokens with: float32 [B, N] for token ids
    [B, N] (or [1, N]), from each row's seed and step (int64 [B]: tokens the row has drawn before this one).
    A pure function of (seed, step, token id), so it needs no generator state, is the same for a token
    whatever else is ranked with it, and the same on any device: the row key is splitmix64 of splitmix64(seed)
    + step * gamma, each token's bits splitmix64 of key + (id + 1) * gamma, like splitmix64's own stream."""
    key = _mix_(_mix_(seed.long().clone()).add_(step.long() * _GAMMA))
    z = _mix_(token_ids.long() * _GAMMA + _GAMMA + key[:, None])
    # The top 23 bits k as (2k + 1) / 2^24: exact in float32, symmetric, and never 0 or 1, so -log(U) is finite
    # and > 0. (24 bits over a float32 would round the top values to 1.0.)
    high = torch.bitwise_right_shift(z, 41).bitwise_and_((1 << 23) - 1)
    return high.mul_(2).add_(1).float().mul_(2.0 ** -24)


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor | None,
                seed: Tensor, step: Tensor, shortlist: int | None = None, *, greedy_rows: bool = True) -> Tensor:
    """One token per row of logits [B, V], each row with its own settings (tensors [B]: float32 temperature,
    top_p, min_p; int64 top_k, seed, step), all on the device: no host sync, so it is CUDA-graph safe with
    `shortlist` None. Rows with temperature 0 take the argmax; the others draw from `filtered_probs` by the
    exponential race: argmax(p / E) with E = -log(U) ~ Exp(1) picks token i with probability p_i / sum(p),
    with no normalisation or multinomial call. U comes from `hash_uniforms` by token id, so a row draws the
    same token alone or in any batch, and whatever `shortlist` its caller could use. min_p None skips min-p;
    `greedy_rows` False (the caller knows every temperature is > 0) skips the argmax, a full pass over V."""
    probs, ids = filtered_probs(logits, temperature, top_k, top_p, shortlist, min_p)
    # Only the looked-at tokens are hashed: a top-k shortlist hashes N values, not V.
    uniform = hash_uniforms(seed, step, ids[:1] if shortlist == NO_CUT else ids)
    # U < 1 makes E > 0; the clamp only guards a masked 0/0 (NaN, which argmax would pick) against rounding.
    race = probs / uniform.log_().neg_().clamp_min_(1e-20)
    sampled = ids.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, sampled, logits.argmax(-1)) if greedy_rows else sampled


def request_seed(params: SamplingParams) -> int:
    """The seed a request draws with, as an int64: its own, else a random one picked now."""
    return _signed64(params.seed if params.seed is not None else secrets.randbits(64))


@dataclass(frozen=True)
class SeededDraws:
    """One request's place in its draws for `sample_tokens`: its seed and the tokens drawn so far, as device
    tensors [1] that `sample_tokens` reads and advances in place, so a CUDA graph that captured them replays
    correctly; `reset` starts a new request in the same tensors. Row i of a batch draws with seed + i."""

    seed: Tensor
    step: Tensor

    @classmethod
    def for_request(cls, params: SamplingParams, device: torch.device) -> SeededDraws:
        draws = cls(torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
        draws.reset(params)
        return draws

    def reset(self, params: SamplingParams) -> None:
        self.seed.fill_(request_seed(params))
        self.step.zero_()

    def row_seeds(self, rows: int) -> Tensor:
        return self.seed + torch.arange(rows, device=self.seed.device)


def request_generator(params: SamplingParams, device: torch.device) -> SeededDraws:
    """A request's draws for `sample_tokens`, seeded by its seed (else at random), so its samples do not
    depend on what else the process draws or on the other rows of its batch."""
    return SeededDraws.for_request(params, device)


def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                  generator: SeededDraws | torch.Generator | None = None, shortlist: int | None = None,
                  *, min_p: Tensor | None = None) -> Tensor:
    """`sample_rows` for rows that share one request's draws (the fast decoder's step): with `SeededDraws`
    row i draws with seed + i at the draws' step, which then advances by one. With a torch generator (or None:
    the device's default one, which a CUDA graph may capture), each call draws fresh row seeds from it."""
    rows = logits.shape[0]
    if isinstance(generator, SeededDraws):
        tokens = sample_rows(logits, temperature, top_k, top_p, min_p, generator.row_seeds(rows),
                             generator.step.expand(rows), shortlist)
        generator.step.add_(1)
        return tokens
    seed = torch.randint(-2**62, 2**62, (rows,), generator=generator, device=logits.device)
    return sample_rows(logits, temperature, top_k, top_p, min_p, seed, torch.zeros_like(seed), shortlist)


# ---- many requests' rows at once -------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSettings:
    """`sample_rows`' per-row tensors for a list of requests, and `index`: the logits row each one samples."""

    index: Tensor
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    seed: Tensor
    step: Tensor

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
              device: torch.device, index: Sequence[int] | None = None) -> RowSettings:
        """The tensors on `device` in one host-to-device copy (one per setting would cost a copy, and on a GPU
        a sync point, each): every column goes as int64, the float ones as their float32 bit patterns."""
        floats = torch.tensor([[0.0 if p.is_greedy else p.temperature for p in params], [p.top_p for p in params],
                               [p.min_p for p in params]], dtype=torch.float32)
        ints = torch.tensor([list(index if index is not None else range(len(params))),
                             # top_k beyond any vocabulary means no cut; capping it keeps a huge value in int64.
                             [min(p.top_k, 2**31) for p in params], list(seeds), list(steps)], dtype=torch.long)
        packed = torch.cat([ints, floats.view(torch.int32).long()]).to(device)
        as_float = packed[4:].int().view(torch.float32)
        return cls(packed[0], as_float[0], packed[1], as_float[1], as_float[2], packed[2], packed[3])

    def part(self, start: int, stop: int) -> RowSettings:
        return RowSettings(*(t[start:stop] for t in self.astuple()))

    def astuple(self) -> tuple[Tensor, ...]:
        return (self.index, self.temperature, self.top_k, self.top_p, self.min_p, self.seed, self.step)

    def sample(self, logits: Tensor, shortlist: int | None, min_p: bool = True) -> Tensor:
        """`sample_rows` over these rows, none of them greedy; `min_p` False skips min-p (no row uses it)."""
        return sample_rows(logits, self.temperature, self.top_k, self.top_p, self.min_p if min_p else None,
                           self.seed, self.step, shortlist, greedy_rows=False)


def cut_shortlist(params: SamplingParams, vocab: int) -> int | None:
    """The cheapest `shortlist` this request's cuts allow over a vocabulary of `vocab` tokens: its top_k,
    NO_CUT if it cuts nothing by rank, None (a full sort) for top-p without top-k."""
    if 0 < params.top_k < vocab:
        return params.top_k
    return NO_CUT if params.top_p >= 1 else None


def sample_batch(logits: Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                 steps: Sequence[int]) -> Tensor:
    """One token per row of logits [B, V] for B requests (their options, `request_seed`s and tokens drawn so
    far): the greedy rows take the argmax; the sampled rows are grouped by the kind of cut their options need
    (top-k, none, a full sort for top-p alone; usually a batch has one) and each group is one `sample_rows`
    call, the top-k group over the largest top_k. The settings go to the device in one copy."""
    vocab = logits.shape[-1]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        if not p.is_greedy:
            shortlist = cut_shortlist(p, vocab)
            groups.setdefault("top_k" if shortlist else "sort" if shortlist is None else "none", []).append(i)
    if not groups:
        return logits.argmax(-1)
    order = [i for rows in groups.values() for i in rows]
    settings = RowSettings.build([params[i] for i in order], [seeds[i] for i in order], [steps[i] for i in order],
                                 logits.device, order)
    # The argmax is a full pass over V (with no fast kernel on a CPU): only for greedy rows.
    picked = logits.argmax(-1) if len(order) < len(params) else None
    start = 0
    for kind, rows in groups.items():
        part = settings.part(start, start + len(rows))
        start += len(rows)
        shortlist = max(params[i].top_k for i in rows) if kind == "top_k" else NO_CUT if kind == "none" else None
        min_p = any(params[i].min_p > 0 for i in rows)
        if len(rows) == len(params):  # every row, in order: no gather or scatter
            return part.sample(logits, shortlist, min_p)
        tokens = part.sample(logits.index_select(0, part.index), shortlist, min_p)
        picked = tokens.new_empty(len(params)) if picked is None else picked
        picked.index_copy_(0, part.index, tokens)
    assert picked is not None  # the groups held every row
    return picked


class RequestSampler:
    """One request's sampler over logits [V] -> a token id tensor [1] (the plain decode loop): `sample_rows`
    with B = 1 and its own count of tokens drawn. `seed` is the request's draw seed, which the batch engines
    read to draw the same tokens for it in a batch (`sample_batch`, at step = the reply's length so far)."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.seed = request_seed(params)
        self._settings = RowSettings.build([params], [self.seed], [0], device)

    def __call__(self, logits: Tensor) -> Tensor:
        if self.params.is_greedy:
            return logits.argmax(-1, keepdim=True)
        row = logits.reshape(1, -1)
        token = self._settings.sample(row, cut_shortlist(self.params, row.shape[-1]), self.params.min_p > 0)
        self._settings.step.add_(1)
        return token


def make_sampler(params: SamplingParams, device: torch.device) -> RequestSampler:
    """A one-request sampler over logits [V] -> a token id tensor [1], with the request's own seed."""
    return RequestSampler(params, device)


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
