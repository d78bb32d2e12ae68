"""An Ollama Modelfile for an exported GGUF file: `ollama create <name> -f <file>.Modelfile` then runs the model
with the prompt format transformers' chat template gives it.

Ollama renders prompts with Go's text/template from its own data (`.System`: the system messages joined,
`.Messages` with `.Role`, `.Content`, `.Thinking`, `.ToolCalls`; `.Tools`; `.Think` / `.IsThinkSet` for Qwen3's
thinking switch; `.Prompt` / `.Response` for the older completion path), so the Jinja template cannot be copied;
the two Qwen chat formats are written out here instead:
- Qwen2 / Qwen2.5 (ChatML): a system turn always (the template's default system prompt when there is none), tool
  signatures inside it, tool calls as <tool_call> JSON, tool results as <tool_response> in a user turn.
- Qwen3: a system turn only when there is a system prompt or tools; an assistant turn after the last user message
  shows its reasoning in <think>; `think: false` appends the empty think block that enable_thinking=False gives.
Sampling defaults come from the model's generation_config.json; stop words are its end-of-turn tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The messages loop shared by both formats. $prev / $rest give a tool message its neighbours (text/template has no
# arithmetic): consecutive tool results share one user turn, as in the Jinja templates.
_TOOL_TURN = """\
{{- else if eq .Role "tool" }}
{{- if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- if or $last (ne (index $rest 1).Role "tool") }}<|im_end|>
{{ end }}"""

_TOOLS_BLOCK = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

QWEN2_TEMPLATE = """\
{{- if .Messages }}<|im_start|>system
{{ if .System }}{{ .System }}{{ else }}@DEFAULT_SYSTEM@{{ end }}
{{- if .Tools }}

@TOOLS@
{{- end }}<|im_end|>
{{ $prev := "" }}
{{- range $i, $_ := .Messages }}
{{- $rest := slice $.Messages $i }}
{{- $last := eq (len $rest) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
@TOOL_TURN@
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- $prev = .Role }}
{{- end }}
{{- else }}<|im_start|>system
{{ if .System }}{{ .System }}{{ else }}@DEFAULT_SYSTEM@{{ end }}<|im_end|>
{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

QWEN3_TEMPLATE = """\
{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}
{{- if .Tools }}

{{ end }}
{{- end }}
{{- if .Tools }}@TOOLS@{{ end }}<|im_end|>
{{ end }}
{{- $lastUser := -1 }}
{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- $prev := "" }}
{{- range $i, $_ := .Messages }}
{{- $rest := slice $.Messages $i }}
{{- $last := eq (len $rest) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and .Thinking (gt $i $lastUser) }}<think>
{{ .Thinking }}
</think>

{{ end }}
{{- $content := .Content }}{{ .Content }}
{{- range $j, $call := .ToolCalls }}
{{- if or $j $content }}
{{ end }}<tool_call>
{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}
</tool_call>
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
@TOOL_TURN@
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- $prev = .Role }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template adds when a conversation has none (Qwen2.5's "You are Qwen, ..."), or
    None: read from the template's own rendering of a one-message conversation."""
    marker = "\x00user\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    head = text.split("<|im_start|>user", 1)[0]
    prefix = "<|im_start|>system\n"
    if head.startswith(prefix) and head.endswith("<|im_end|>\n"):
        return head[len(prefix):-len("<|im_end|>\n")]
    return None


def ollama_template(tokenizer: Any) -> tuple[str | None, str]:
    """(Go template for Ollama, the format's name) for the tokenizer's chat template; (None, why) when it is not a
    Qwen ChatML template."""
    template = _chat_template(tokenizer)
    if not template or "<|im_start|>" not in template:
        return None, "the tokenizer has no ChatML (<|im_start|>) chat template"
    if "<think>" in template:
        return QWEN3_TEMPLATE.replace("@TOOLS@", _TOOLS_BLOCK).replace("@TOOL_TURN@", _TOOL_TURN), "qwen3"
    system = default_system(tokenizer) or ""
    if '"""' in system or "{{" in system:
        return None, "the default system prompt cannot be written inside a Modelfile template"
    go = QWEN2_TEMPLATE.replace("@TOOLS@", _TOOLS_BLOCK).replace("@TOOL_TURN@", _TOOL_TURN)
    return go.replace("@DEFAULT_SYSTEM@", system), "qwen2.5"


# generation_config.json key -> Ollama PARAMETER name.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}


def sampling_parameters(generation_config: Any) -> dict[str, float | int]:
    """The sampling defaults generation_config.json sets (those left at transformers' defaults are not sent, so
    Ollama's own apply)."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else dict(generation_config)
    return {name: diff[key] for key, name in _SAMPLING.items() if diff.get(key) is not None}


def stop_words(tokenizer: Any, generation_config: Any) -> list[str]:
    """End-of-turn tokens: the model's eos token(s), and <|im_start|> so that a new turn is never begun."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id, *ids]
    words = [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    if "<|im_start|>" in tokenizer.get_vocab():
        words.append("<|im_start|>")
    return list(dict.fromkeys(w for w in words if w))


def modelfile_text(gguf_name: str, tokenizer: Any, generation_config: Any) -> tuple[str, dict[str, Any]]:
    """The Modelfile for `gguf_name` (a file beside it) and what went into it, for the export report."""
    template, fmt = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    stops = stop_words(tokenizer, generation_config)
    lines += [f"PARAMETER stop {json.dumps(w)}" for w in stops]
    params = sampling_parameters(generation_config)
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    info: dict[str, Any] = {"template": fmt if template is not None else None, "stop": stops, "parameters": params}
    if template is None:
        info["note"] = f"no TEMPLATE: {fmt}; Ollama will use the GGUF's chat template metadata if it knows it"
    return "\n".join(lines) + "\n", info


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")
