"""Loads an adapter folder with plain peft (no Qwenbook code) and prints, as one JSON line, the greedy reply's
token ids for a chat prompt, for comparing with what the worker generates with the same adapter.

usage: python peft_check.py MODEL_DIR ADAPTER_DIR PROMPT MAX_NEW_TOKENS
"""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, adapter_dir, prompt, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
    print(json.dumps({"ids": out[0, enc["input_ids"].shape[1]:].tolist()}))


if __name__ == "__main__":
    main()
