"""In-process reference for the integration tests: the greedy generations the worker runs, done here
without ZeroMQ (with the engine, and with plain Hugging Face `generate` as an independent check).

usage: python reference.py MODEL_DIR JOBS_JSON   (prints one JSON line: a result per job)
  {"kind": "greedy", "messages": [...], "max_tokens": N}
      -> {"engine_text", "engine_ids", "hf_ids", "prompt_tokens"}
  {"kind": "conversation", "system": S, "turns": [U1, U2, ...], "max_tokens": N}
      -> {"replies": [...], "prompt_tokens": [...]}   each turn sent with the whole history before it
One process does every job: importing torch and loading the model dominate the cost.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    path, jobs = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from qwenbook_bridge.engine import LoadOptions, SamplingParams, load_model
    from qwenbook_bridge.engine.generate.generation import generate
    from qwenbook_bridge.engine.generate.generation import prompt_ids

    loaded = load_model(path, LoadOptions(dtype="fp32", device="cpu"))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def greedy(messages, max_tokens):
        return generate(loaded, messages, SamplingParams(max_tokens=max_tokens, greedy=True))

    def hf_greedy(messages, max_tokens):
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=max_tokens)
        return out[0, prompt.shape[1]:].tolist(), int(prompt.shape[1])

    results = []
    for job in jobs:
        if job["kind"] == "greedy":
            res = greedy(job["messages"], job["max_tokens"])
            hf_ids, n_prompt = hf_greedy(job["messages"], job["max_tokens"])
            results.append({"engine_text": res.text, "engine_ids": res.token_ids, "hf_ids": hf_ids,
                            "prompt_tokens": n_prompt})
        elif job["kind"] == "conversation":
            messages = [{"role": "system", "content": job["system"]}]
            replies, counts = [], []
            for turn in job["turns"]:
                messages.append({"role": "user", "content": turn})
                counts.append(len(prompt_ids(loaded, messages)))
                reply = greedy(messages, job["max_tokens"]).text
                replies.append(reply)
                messages.append({"role": "assistant", "content": reply})
            results.append({"replies": replies, "prompt_tokens": counts})
        else:
            raise SystemExit(f"unknown job kind {job['kind']!r}")
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
