"""Models and prompts for the benchmarks: the Qwen2.5-7B or Qwen2.5-0.5B shape with random weights (no download
needed), a small shape for quick CPU runs, or a local folder."""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# What a model folder needs from a tokenizer folder (not its config or weights, which would replace the model's).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def copy_tokenizer(tokenizer: Path, into: Path) -> Path:
    """Copy a tokenizer folder's tokenizer files (not its config or weights, which would replace the model's)."""
    import shutil

    copied = [name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{tokenizer} has no tokenizer.json: pass --tokenizer with a Qwen tokenizer folder")
    for name in copied:
        shutil.copy(tokenizer / name, into / name)
    return into

# Qwen2.5-7B's config.json, as far as the computation's shape goes.
QWEN25_7B: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False)

# Qwen2.5-0.5B(-Instruct)'s config.json, as far as the computation's shape goes: the model Binder and workshop
# laptops run on a few CPU cores (bench/cpu.py).
QWEN25_05B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, use_sliding_window=False)

SMALL: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.5)

SHAPES: dict[str, dict[str, Any]] = {"7b": QWEN25_7B, "0.5b": QWEN25_05B, "small": SMALL}


CONTROL_TOKENS_FROM = 151643  # Qwen2.5's <|endoftext|>, the first of its control tokens


def build_random_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A Qwen2ForCausalLM of one of SHAPES with random weights, created directly on `device`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}")
    config = Qwen2Config(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # transformers initialises biases to zero and norms to one; perturb them so a decoder that ignored
    # either would give different tokens and fail the comparison.
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32) * 0.5)
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32))
        # Ids from the control tokens up (and the padding rows past the tokenizer) have no text. A random model
        # that keeps choosing one streams nothing for hundreds of tokens, so a streaming benchmark's first-token
        # and inter-token times would measure the weights' luck; zero logits there leave them to lose the argmax.
        model.lm_head.weight[CONTROL_TOKENS_FROM:].zero_()
    model.generation_config.eos_token_id = None
    return model.eval()


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a folder holding a saved model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device)}).eval()


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Stay below the special-token range so a real tokenizer's control tokens are never drawn.
    high = min(vocab, CONTROL_TOKENS_FROM)
    return torch.randint(0, high, (count, length), generator=gen).tolist()


def check_prompts(vocab: int, count: int, longest: int, seed: int) -> list[list[int]]:
    """`count` prompts of different lengths, the longest `longest` tokens."""
    lengths = [max(1, longest * (i + 1) // count) for i in range(count)]
    lengths = [max(1, n - 3 * i) for i, n in enumerate(lengths)]
    return [random_prompts(vocab, 1, n, seed + i)[0] for i, n in enumerate(lengths)]


def run_scenario(what: str, fn: Callable[[], None], errors: list[dict[str, str]], device: torch.device,
                 save: Callable[[], None]) -> None:
    """Runs one benchmark scenario. A failure (out of memory, a compile error) must not lose the other
    scenarios' figures: it is recorded in `errors` and on stderr, memory is released and the JSON saved."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON and on stderr, then the run goes on
        errors.append({"scenario": what, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()})
        print(f"[bench] {what} failed: {exc}", file=sys.stderr, flush=True)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
