// Renders an Ollama TEMPLATE the way Ollama does (Go's text/template over Ollama's data shape) and prints it.
//
// Input (JSON file given as the only argument):
//
//	{ "template": "...", "messages": [{role, content, thinking?, tool_calls?: [{function: {name, arguments}}]}],
//	  "tools": [{type, function: {name, description, parameters}}], "think": bool|null, "prompt": "..." }
//
// With "prompt" the older completion path is rendered (.System, .Prompt), else the chat path. As in Ollama's
// template.Execute: system messages are joined into .System ("\n\n") and stay in .Messages; consecutive
// messages of one role (tool results aside) are merged; a tool's function and a call's arguments print as
// compact JSON (their String methods).
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Arguments map[string]any

func (a Arguments) String() string { b, _ := json.Marshal(map[string]any(a)); return string(b) }

type CallFunction struct {
	Name      string    `json:"name"`
	Arguments Arguments `json:"arguments"`
}

type ToolCall struct {
	Function CallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

type ToolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
}

func (f ToolFunction) String() string { b, _ := json.Marshal(f); return string(b) }

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Spec struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
	Think    *bool     `json:"think"`
	Prompt   *string   `json:"prompt"`
	System   string    `json:"system"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msg.Role && msg.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msg.Content
		} else {
			out = append(out, &msg)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var spec Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(spec.Template))
	var data map[string]any
	if spec.Prompt != nil {
		data = map[string]any{"System": spec.System, "Prompt": *spec.Prompt, "Response": ""}
	} else {
		system, messages := collate(spec.Messages)
		think := spec.Think != nil && *spec.Think
		data = map[string]any{"System": system, "Messages": messages, "Tools": spec.Tools, "Response": "",
			"Think": think, "IsThinkSet": spec.Think != nil}
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(1)
	}
}
