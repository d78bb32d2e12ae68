"""Chat generation with a hand-written decode loop.

Owning the loop (rather than calling `model.generate`) gives a cancel check between any two tokens, a
streaming callback with no extra thread, and exact timings. Greedy output matches `model.generate(do_sample=False)`
token for token; the tests hold it to that.
"""

from __future__ import annotations

import inspect
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qwenbook_bridge.engine.errors import (GenerationOutOfMemoryError, InvalidOptionError, ModelNotLoadedError,
    NoChatTemplateError, first_sentences, is_out_of_memory)
from qwenbook_bridge.engine.models.loading import LoadedModel, free_memory
from qwenbook_bridge.engine.generate.streaming import IncrementalDetokenizer, StopStringFilter

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_EOS_IDS = 8  # the fast decoder's stop-id slots


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationOptions:
    max_tokens: int = 512
    temperature: float = 0.7  # Qwen2.5-Instruct's recommended sampling settings
    top_p: float = 0.8
    top_k: int = 20  # 0 turns top-k off
    greedy: bool = False  # argmax; sampling settings and seed are ignored
    stop: list[str] = field(default_factory=list)  # cut the reply before the first of these
    seed: int | None = None  # fixes sampling for this request only

    def validate(self) -> GenerationOptions:
        """Raise InvalidOptionError naming the option (as the notebook API spells it) and the bad value."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidOptionError(f"maxTokens must be at least 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidOptionError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise InvalidOptionError(f"topP must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidOptionError(f"topK must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not isinstance(self.greedy, bool):
            raise InvalidOptionError(f"greedy must be true or false, got {self.greedy!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidOptionError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidOptionError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise InvalidOptionError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")
        return self


@dataclass
class TokenDelta:
    text: str
    token_ids: list[int]
    index: int  # tokens generated before this delta


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (end-of-sequence token) | length | stop_string | cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float  # call start (templating included) to the first sampled token
    duration_ms: float
    tokens_per_s: float  # decode speed: tokens after the first over the time after the first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidOptionError("messages must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidOptionError(
                f"messages[{i}] must be {{role: 'system' | 'user' | 'assistant', content: string}}, got {m!r}")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def prompt_ids(loaded: LoadedModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat-formatted prompt, ending with the assistant turn's opening."""
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"the tokenizer of {loaded.model_id} has no chat template, so chat messages cannot be turned into a "
            "prompt; load an instruct/chat model (e.g. Qwen/Qwen2.5-7B-Instruct) or add a chat_template to its "
            "tokenizer_config.json")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    # The template already wrote every special token; letting the tokenizer add a BOS would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sampler(opts: GenerationOptions, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if opts.greedy or opts.temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator(device=device)
    generator.manual_seed(opts.seed if opts.seed is not None else secrets.randbits(63))
    inv_temperature = 1.0 / opts.temperature

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scaled = logits.float() * inv_temperature
        if 0 < opts.top_k < scaled.shape[-1]:
            values, indices = torch.topk(scaled, opts.top_k)
        elif opts.top_p < 1:
            values, indices = torch.sort(scaled, descending=True)
        else:
            probs = torch.softmax(scaled, -1)
            return torch.multinomial(probs, 1, generator=generator)
        probs = torch.softmax(values, -1)
        if opts.top_p < 1:
            # Keep the smallest prefix whose mass reaches top_p; the first token always survives.
            outside = (probs.cumsum(-1) - probs) > opts.top_p
            probs = probs.masked_fill(outside, 0.0)
        return indices[torch.multinomial(probs, 1, generator=generator)]

    return sample


def _token_stream(loaded: LoadedModel, prompt: list[int], budget: int, context: int,
                  opts: GenerationOptions) -> Iterator[int]:
    """The reply's tokens, one at a time, from the fast decoder where it applies (engine/generate/decoders.py), else
    from transformers' forward with a dynamic cache. Closing the iterator stops decoding."""
    from qwenbook_bridge.engine.generate.decoders import decoder_for

    model = loaded.model
    decoder = decoder_for(model, loaded.device, len(prompt) + budget, context)
    # A decoder serves one request at a time; a second request for the same model meanwhile takes the plain loop.
    if decoder is not None and decoder.busy.acquire(blocking=False):
        try:
            yield from _fast_stream(decoder, loaded, prompt, budget, opts)
        finally:
            decoder.busy.release()
        return
    yield from _plain_stream(model, loaded.device, prompt, opts)


def _fast_stream(decoder: Any, loaded: LoadedModel, prompt: list[int], budget: int,
                 opts: GenerationOptions) -> Iterator[int]:
    from qwenbook_bridge.engine.generate.fast_decode import SamplingParams

    greedy = opts.greedy or opts.temperature == 0
    sampling = SamplingParams() if greedy else SamplingParams(
        temperature=float(opts.temperature), top_k=int(opts.top_k), top_p=float(opts.top_p), seed=opts.seed)
    stop_ids = sorted(loaded.eos_token_ids)[:MAX_EOS_IDS]
    for step in decoder.stream([prompt], budget, sampling, eos_token_ids=stop_ids):
        if step[0] is None:
            return
        yield step[0]


def _plain_stream(model: Any, device: torch.device, prompt: list[int], opts: GenerationOptions) -> Iterator[int]:
    from transformers import DynamicCache

    sample = _sampler(opts, device)
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    ids = torch.tensor([prompt], device=device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits[0, -1]
    while True:
        next_id = sample(logits)
        yield int(next_id)
        logits = model(input_ids=next_id.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1]


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate(loaded: LoadedModel, messages: Sequence[dict[str, str]], opts: GenerationOptions | None = None,
             on_token: Callable[[TokenDelta], None] | None = None,
             cancel: threading.Event | None = None) -> GenerationResult:
    """Generate a chat reply. `on_token` gets text deltas as they become safe to show; `cancel` stops the
    loop before the next token and the result keeps the partial reply."""
    started = time.perf_counter()
    opts = (opts or GenerationOptions()).validate()
    model = loaded.model
    if model is None:
        raise ModelNotLoadedError(f"model {loaded.model_id!r} was unloaded; load it again")
    prompt = prompt_ids(loaded, check_messages(messages))
    budget = opts.max_tokens
    context = int(loaded.info.get("context_length") or 0)
    if context:
        if len(prompt) >= context:
            raise InvalidOptionError(
                f"the prompt is {len(prompt)} tokens but {loaded.model_id} holds at most {context}; "
                "shorten the conversation or the system prompt")
        budget = min(budget, context - len(prompt))

    detok = IncrementalDetokenizer(loaded.tokenizer)
    stops = StopStringFilter(opts.stop)
    eos = loaded.eos_token_ids
    pieces: list[str] = []
    token_ids: list[int] = []
    pending: list[int] = []  # ids whose text has not been delivered yet
    delivered = 0

    def deliver(text: str) -> None:
        nonlocal pending, delivered
        if text:
            pieces.append(text)
        if on_token is not None:
            on_token(TokenDelta(text, pending, delivered))
        delivered += len(pending)
        pending = []

    finish, tail = "length", ""
    t_first = t_last = None
    failure: GenerationOutOfMemoryError | None = None
    tokens: Iterator[int] | None = None
    try:
        with torch.inference_mode():
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                tokens = _token_stream(loaded, prompt, budget, context, opts)
                for token in tokens:
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first = t_last
                    token_ids.append(token)
                    pending.append(token)
                    if token in eos:
                        finish = "stop"
                        break
                    text = stops.push(detok.push(token))
                    if stops.hit is not None:
                        finish, tail = "stop_string", text  # the text before the stop string
                        break
                    if text:
                        deliver(text)
                    if len(token_ids) >= budget:
                        finish = "length"
                        break
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        # Built here, raised below: leaving the except block drops the traceback and with it the frames that
        # hold this step's activations, so the memory can actually be given back first.
        failure = GenerationOutOfMemoryError(
            f"out of memory on {loaded.device} while generating ({first_sentences(e)}), with a {len(prompt)}-token "
            f"prompt after {len(token_ids)} new token(s). Try a shorter conversation or a smaller max_tokens (now "
            f"{opts.max_tokens}), unload models you no longer use, or let a training run on the same device finish "
            f"first. {loaded.model_id} is still loaded and usable.")
    finally:
        if tokens is not None:
            tokens.close()  # the plain loop's KV cache is the bulk of what generation holds
    if failure is not None:
        free_memory()
        raise failure

    if finish != "stop_string":
        tail = stops.push(detok.flush())
        finish = "stop_string" if stops.hit is not None else finish
        tail += stops.flush()
    if tail or pending:
        deliver(tail)
    ended = time.perf_counter()
    n = len(token_ids)
    if n > 1 and t_last > t_first:
        speed = (n - 1) / (t_last - t_first)
    else:
        speed = n / max(ended - started, 1e-9)
    return GenerationResult(
        text="".join(pieces),
        token_ids=token_ids,
        finish_reason=finish,
        prompt_tokens=len(prompt),
        completion_tokens=n,
        ttft_ms=round((t_first - started) * 1000, 3) if t_first is not None else 0.0,
        duration_ms=round((ended - started) * 1000, 3),
        tokens_per_s=round(speed, 3),
    )
