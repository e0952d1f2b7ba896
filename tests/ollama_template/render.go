// Renders a Modelfile TEMPLATE the way Ollama's chat endpoint does, for tests/test_export_ollama.py.
//
// Written for this project from Ollama's template/template.go (ollama/ollama commit 0097ef5ff1f3; read, not
// copied). Re-implemented: its collate() and the value map Template.Execute passes on the .Messages path.
// Go's own text/template does the rendering (missingkey=zero, as Ollama's Parse). Not re-implemented: the
// "json" template function, the legacy .Prompt/.Response path, image tags.
// the messages are collated first (every system message's text gathered into .System, joined by a
// blank line; consecutive messages of the same role merged into one, their contents joined by "\n\n"),
// then the template runs on {.System, .Messages, .Tools, .Response, .Think, ...} with missing keys as
// zero values. Only the standard library: it builds offline.
//
// Input (stdin): {"template": "...", "messages": [{"role": "...", "content": "..."}, ...]}
// Output (stdout): the rendered prompt, nothing else.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// message has the fields Ollama's templates see on each of .Messages.
type message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type input struct {
	Template string `json:"template"`
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
}

// collate gathers the system prompt and merges runs of same-role messages (tool results stay apart).
func collate(in input) (string, []*message) {
	var system []string
	var out []*message
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, &message{Role: m.Role, Content: m.Content})
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "render: bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render: template does not parse:", err)
		os.Exit(1)
	}
	system, messages := collate(in)
	values := map[string]any{
		"System": system, "Messages": messages, "Tools": nil, "Response": "",
		"Think": false, "ThinkLevel": "", "IsThinkSet": false,
	}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "render: template failed:", err)
		os.Exit(1)
	}
}
