"""Python side of the export integration tests: makes inputs (adapters, another architecture) and checks what the
worker wrote with plain transformers / peft, independently of the worker's own code.

usage: python export_check.py BASE_MODEL_DIR JOBS_JSON   (prints one JSON line: a result per job)
       python export_check.py BASE_MODEL_DIR -          (a JOBS_JSON per stdin line, each answered by a line
                                                        {"ok": [result per job]} or {"error": traceback}: one
                                                        interpreter and one base model load for a whole test file)
  {"kind": "adapter", "out": DIR, "seed": N}         a peft LoRA adapter with random non-zero lora_B -> {}
  {"kind": "llama", "out": DIR}                       a tiny LlamaForCausalLM folder with the base's tokenizer -> {}
  {"kind": "chat_prompt", "messages": [...], "max_tokens": N, "model": DIR?}
      -> {"prompt_ids", "greedy_ids", "smallest_gap"}  the chat-formatted prompt, the base's (or DIR's model's)
                                                       greedy continuation and the smallest top-1/top-2 logit gap
  {"kind": "compare", "folder": DIR, "adapter": DIR | null, "texts": [...]}
      -> {"max_diff", "adapter_effect"}                max |logits(folder) - logits(base [+ adapter])| in fp32,
                                                       and how much the adapter moves the base's logits
  {"kind": "hf_greedy", "folder": DIR, "prompt_ids": [...], "max_tokens": N} -> {"ids"}  plain transformers generate
  {"kind": "env"} -> {"bitsandbytes": bool}
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    base_dir, jobs = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)

    def logits(model, text: str) -> torch.Tensor:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            return model(input_ids=ids).logits[0].float()

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [run_job(job) for job in jobs]

    def run_job(job: dict[str, Any]) -> dict[str, Any]:
        kind = job["kind"]
        if kind == "adapter":
            import copy

            from peft import LoraConfig, get_peft_model

            torch.manual_seed(job["seed"])
            pm = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
            pm.save_pretrained(job["out"])
            return {}
        elif kind == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            out = Path(job["out"])
            LlamaForCausalLM(LlamaConfig(vocab_size=base.config.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).save_pretrained(out)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(base_dir / name, out / name)
            return {}
        elif kind == "chat_prompt":
            # Another model's prompt in the same process: one interpreter start less than a second run.
            model, model_tok = base, tok
            if job.get("model"):
                model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
                model_tok = AutoTokenizer.from_pretrained(job["model"])
            text = model_tok.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=False)
            prompt = model_tok(text, add_special_tokens=False).input_ids
            x, gap = torch.tensor([prompt]), float("inf")
            with torch.no_grad():
                for _ in range(job["max_tokens"]):
                    top = model(input_ids=x).logits[0, -1].topk(2)
                    gap = min(gap, (top.values[0] - top.values[1]).item())
                    x = torch.cat([x, top.indices[:1][None]], dim=1)
            return {"prompt_ids": prompt, "greedy_ids": x[0, len(prompt):].tolist(), "smallest_gap": gap}
        elif kind == "compare":
            saved = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32).eval()
            reference, effect = base, 0.0
            if job.get("adapter"):
                from peft import PeftModel

                reference = PeftModel.from_pretrained(base, job["adapter"]).eval()
            diffs = []
            for text in job["texts"]:
                want = logits(reference, text)
                diffs.append((logits(saved, text) - want).abs().max().item())
                if reference is not base:
                    with reference.disable_adapter():
                        effect = max(effect, (logits(reference, text) - want).abs().max().item())
            if reference is not base:
                reference.unload()
            return {"max_diff": max(diffs), "adapter_effect": effect}
        elif kind == "hf_greedy":
            model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32).eval()
            prompt = torch.tensor([job["prompt_ids"]])
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=job["max_tokens"])
            return {"ids": out[0, prompt.shape[1]:].tolist()}
        elif kind == "env":
            return {"bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}
        raise ValueError(f"unknown job kind {kind!r}")

    if jobs != "-":
        print(json.dumps(run(json.loads(jobs))))
        return
    for line in sys.stdin:
        try:
            reply: dict[str, Any] = {"ok": run(json.loads(line))}
        except Exception:  # the test that asked shows it; later requests still get answers
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
