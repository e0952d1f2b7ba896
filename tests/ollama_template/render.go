// Renders a Modelfile TEMPLATE the way Ollama's chat endpoint does, for tests/test_export_ollama.py.
//
// Written for this project from Ollama's template/template.go and api/types.go (ollama/ollama commit
// fb30760996871fa9460115c753afd2c60d4ab0f7, August 2026; read, not copied). Re-implemented:
//   - collate(): every system message's text gathered into .System, joined by a blank line; consecutive
//     messages of the same role (but tool) merged into one, their contents joined by "\n\n";
//   - the value map Template.Execute passes on the .Messages path: System, Messages, Tools, Response "",
//     Think, ThinkLevel, IsThinkSet;
//   - the shapes templates see: convertMessagesForTemplate (each message's ToolCalls with Arguments as a plain
//     Go map, decoded from JSON as Ollama's ordered map decodes its values: numbers float64, objects
//     map[string]any) and convertToolsForTemplate (each tool's parameter Properties as a plain Go map of
//     ToolProperty; a property's own nested Properties an opaque value that marshals to compact JSON in
//     its original order, as Ollama's ordered map does);
//   - the "json" template function (json.Marshal);
//   - with "want": "tag", the tool-call tag Ollama's tools/template.go parseTag reads off a template (the first
//     non-blank text inside the first {{ if }} on a .ToolCalls field, up to a "{", trimmed; "{" when none), which
//     its tool-call parser then looks for in the model's output.
//
// Go's own text/template does the rendering (missingkey=zero, as Ollama's Parse). Not re-implemented: the
// legacy .Prompt/.Response path, image tags, the other template functions (currentDate, toTypeScriptType).
// Only the standard library: it builds offline.
//
// Input (stdin): {"template": "...", "messages": [Ollama api.Message JSON ...], "tools": [api.Tool JSON ...]}
// Output (stdout): the rendered prompt, nothing else.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// --- the api types, as far as the templates see them -------------------------------------------------

type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int            `json:"index"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

type apiMessage struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	Images     []string   `json:"images"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

// propertyType is api.PropertyType: a JSON string or a list of strings, always a list here.
type propertyType []string

func (p *propertyType) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*p = propertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(data, &many); err != nil {
		return err
	}
	*p = many
	return nil
}

// nestedProperties stands for api.ToolPropertiesMap (an ordered map with unexported fields: a template cannot
// range over it); json.Marshal writes it compact, in its original key order.
type nestedProperties struct{ raw json.RawMessage }

func (n *nestedProperties) UnmarshalJSON(data []byte) error {
	n.raw = append(json.RawMessage(nil), data...)
	return nil
}

func (n *nestedProperties) MarshalJSON() ([]byte, error) {
	var out bytes.Buffer
	err := json.Compact(&out, n.raw)
	return out.Bytes(), err
}

// ToolProperty has api.ToolProperty's fields, in its order.
type ToolProperty struct {
	AnyOf       []ToolProperty    `json:"anyOf,omitempty"`
	Type        propertyType      `json:"type,omitempty"`
	Items       any               `json:"items,omitempty"`
	Description string            `json:"description,omitempty"`
	Enum        []any             `json:"enum,omitempty"`
	Properties  *nestedProperties `json:"properties,omitempty"`
	Required    []string          `json:"required,omitempty"`
}

type apiTool struct {
	Type     string `json:"type"`
	Items    any    `json:"items"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string                  `json:"type"`
			Defs       any                     `json:"$defs"`
			Items      any                     `json:"items"`
			Required   []string                `json:"required"`
			Properties map[string]ToolProperty `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

// --- what Template.Execute hands the template -----------------------------------------------------------

type templateArgs map[string]any
type templateProperties map[string]ToolProperty

type templateToolCall struct {
	ID       string
	Function struct {
		Index     int
		Name      string
		Arguments templateArgs
	}
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

type templateTool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string             `json:"type"`
			Defs       any                `json:"$defs,omitempty"`
			Items      any                `json:"items,omitempty"`
			Required   []string           `json:"required,omitempty"`
			Properties templateProperties `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type input struct {
	Want     string       `json:"want"`
	Template string       `json:"template"`
	Messages []apiMessage `json:"messages"`
	Tools    []apiTool    `json:"tools"`
}

// collate gathers the system prompt and merges runs of same-role messages (tool results stay apart).
func collate(msgs []apiMessage) (string, []*apiMessage) {
	var system []string
	var out []*apiMessage
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[n-1].Content += "\n\n" + msgs[i].Content
			continue
		}
		out = append(out, &msgs[i])
	}
	return strings.Join(system, "\n\n"), out
}

func messagesForTemplate(msgs []*apiMessage) []*templateMessage {
	var out []*templateMessage
	for _, m := range msgs {
		var calls []templateToolCall
		for _, c := range m.ToolCalls {
			var call templateToolCall
			call.ID, call.Function.Index, call.Function.Name = c.ID, c.Function.Index, c.Function.Name
			call.Function.Arguments = templateArgs(c.Function.Arguments)
			calls = append(calls, call)
		}
		out = append(out, &templateMessage{
			Role: m.Role, Content: m.Content, Thinking: m.Thinking, Images: m.Images, ToolCalls: calls,
			ToolName: m.ToolName, ToolCallID: m.ToolCallID,
		})
	}
	return out
}

func toolsForTemplate(tools []apiTool) []templateTool {
	if tools == nil {
		return nil
	}
	out := make([]templateTool, len(tools))
	for i, t := range tools {
		out[i].Type, out[i].Items = t.Type, t.Items
		f, p := &out[i].Function, t.Function.Parameters
		f.Name, f.Description = t.Function.Name, t.Function.Description
		f.Parameters.Type, f.Parameters.Defs, f.Parameters.Items = p.Type, p.Defs, p.Items
		f.Parameters.Required, f.Parameters.Properties = p.Required, templateProperties(p.Properties)
	}
	return out
}

// toolCallTag is the tag parseTag finds: the first text of the first if-node on .ToolCalls, cut at "{".
func toolCallTag(nodes []parse.Node) (string, bool) {
	for _, node := range nodes {
		var lists []*parse.ListNode
		switch n := node.(type) {
		case *parse.IfNode:
			if onToolCalls(n.Pipe) {
				if text := firstText(n.List.Nodes); text != "" {
					tag, _, _ := strings.Cut(text, "{")
					if tag = strings.TrimSpace(tag); tag != "" {
						return tag, true
					}
				}
				return "{", true
			}
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ListNode:
			lists = []*parse.ListNode{n}
		}
		for _, list := range lists {
			if list != nil {
				if tag, ok := toolCallTag(list.Nodes); ok {
					return tag, true
				}
			}
		}
	}
	return "", false
}

func onToolCalls(pipe *parse.PipeNode) bool {
	for _, cmd := range pipe.Cmds {
		for _, arg := range cmd.Args {
			if field, ok := arg.(*parse.FieldNode); ok {
				for _, ident := range field.Ident {
					if ident == "ToolCalls" {
						return true
					}
				}
			}
		}
	}
	return false
}

// firstText is the first non-blank text node, looking into if-nodes but not past other actions' bodies.
func firstText(nodes []parse.Node) string {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) > 0 {
				return string(n.Text)
			}
		case *parse.IfNode:
			if text := firstText(n.List.Nodes); text != "" {
				return text
			}
		}
	}
	return ""
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "render: bad input:", err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render: template does not parse:", err)
		os.Exit(1)
	}
	if in.Want == "tag" {
		tag, ok := toolCallTag(tmpl.Tree.Root.Nodes)
		if !ok {
			tag = "{"
		}
		fmt.Print(tag)
		return
	}
	system, messages := collate(in.Messages)
	values := map[string]any{
		"System": system, "Messages": messagesForTemplate(messages), "Tools": toolsForTemplate(in.Tools),
		"Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false,
	}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "render: template failed:", err)
		os.Exit(1)
	}
}
