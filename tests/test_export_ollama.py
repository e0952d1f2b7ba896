"""The Modelfile's TEMPLATE executed as Ollama executes it (Go's text/template after Ollama's collation),
then tokenised by llama.cpp with BOS: mistral_common's ids.

No Ollama build is reachable here, so this is not Ollama's own code. ``ollama_template/render.go`` is a small
standard-library Go program written for this test. From Ollama's ``template/template.go`` (ollama/ollama at commit
0097ef5ff1f3, read, not copied) it re-implements exactly: ``collate`` (every system message's text gathered into
``.System``, joined by a blank line; consecutive same-role messages but ``tool`` merged with ``"\\n\\n"``) and the
value map ``Template.Execute`` passes on the ``.Messages`` path (System, Messages, Tools, Response "", Think,
IsThinkSet). The rendering itself is Go's own ``text/template`` with ``missingkey=zero`` (what Ollama's ``Parse``
sets). Not re-implemented: Ollama's ``json`` template function (our template does not call it), its legacy
``.Prompt``/``.Response`` path (our template uses ``.Messages``), image tags, server-side context truncation.
What Go templates cannot do, and so what Ollama prompts differ on (documented in gguf.py and README): no
right-strip of assistant history (mistral_common strips trailing spaces), no skipping of empty messages.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_module, write_minimal_gguf
from tool_conversations import check_gguf_tool_prompts

from mistral_fast.export import export_gguf, write_modelfile
from mistral_fast.export.gguf import OLLAMA_TEMPLATE
from mistral_fast.modeling import tiny_model_dir
from mistral_fast.tokenizer import reference_chat_ids

llama_cpp = require_module("llama_cpp", "pip install 'mistral-fast[gguf]'")

S, U, A = "system", "user", "assistant"
PROMPTS = {  # each ends where Ollama asks the model to answer
    "one-turn": [(U, "Hi")],
    "system": [(S, "Be brief."), (U, "  Two  spaces: 10 °F in °C?")],
    "several-turns": [(S, "You convert units."), (U, "3 miles?"), (A, "4.83 km"), (U, "And 10 kg\nin lb?")],
    "merged-turns": [(U, "First part."), (U, "Second part."), (A, "Merged reply."), (A, "More."), (U, "日本語 🙂")],
    "two-systems": [(S, "Rule one."), (S, "Rule two."), (U, "Q1"), (A, "A1"), (U, "Q2")],
    "system-between-users": [(U, "Q1"), (S, "Late rule."), (U, "Q2")],
    "system-last": [(S, "Rule."), (U, "Q"), (S, "Another rule.")],
}


@pytest.fixture(scope="module")
def render(go_executable: str, tmp_path_factory: pytest.TempPathFactory):
    """Build the renderer once (offline: standard library only), return ``render(template, messages)``."""
    binary = tmp_path_factory.mktemp("go") / "render"
    source = Path(__file__).parent / "ollama_template" / "render.go"
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    proc = subprocess.run(
        [go_executable, "build", "-o", str(binary), str(source)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr

    def run(template: str, messages: list[dict[str, str]]) -> str:
        data = json.dumps({"template": template, "messages": messages})
        out = subprocess.run([str(binary)], input=data.encode(), capture_output=True, check=False)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode()

    return run


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory):
    path = export_gguf(tiny_model_dir(), tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _template_of_modelfile(tmp_path: Path) -> str:
    text = write_modelfile(write_minimal_gguf(tmp_path / "m.gguf")).read_text()
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_ollama_renders_our_template_to_mistral_common_ids(render, vocab, tmp_path: Path, case: str) -> None:
    template = _template_of_modelfile(tmp_path)
    assert template == OLLAMA_TEMPLATE
    messages = _messages(PROMPTS[case])
    text = render(template, messages)
    got = vocab.tokenize(text.encode(), add_bos=True, special=True)  # Ollama: llama.cpp adds BOS (add_bos_token)
    assert got == reference_chat_ids(messages, "v3", add_generation_prompt=True), text


def test_ollama_continues_a_final_assistant_message_like_mistral_common(render, vocab, tmp_path: Path) -> None:
    messages = _messages([(S, "Be brief."), (U, "Count to three."), (A, "One, two,")])
    text = render(_template_of_modelfile(tmp_path), messages)
    got = vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert got == reference_chat_ids(messages, "v3", continue_final_message=True)


def test_what_go_templates_cannot_do_is_documented(render, vocab) -> None:
    """Assistant history with trailing spaces: mistral_common strips them, a Go template cannot."""
    messages = _messages([(U, "Q1"), (A, "A1  "), (U, "Q2")])
    got = vocab.tokenize(render(OLLAMA_TEMPLATE, messages).encode(), add_bos=True, special=True)
    assert got != reference_chat_ids(messages, "v3", add_generation_prompt=True)
    stripped = _messages([(U, "Q1"), (A, "A1"), (U, "Q2")])
    assert reference_chat_ids(stripped, "v3", add_generation_prompt=True) == reference_chat_ids(
        messages, "v3", add_generation_prompt=True
    )


# ------------------------------------------------------------------- tools in the GGUF's embedded template


def test_gguf_template_renders_tool_prompts_to_mistral_common_ids(vocab) -> None:
    """v3: [AVAILABLE_TOOLS], [TOOL_CALLS] and [TOOL_RESULTS] JSON written by the template's own JSON writer,
    so plain Jinja2 (whose tojson sorts keys and escapes non-ASCII) renders it as mistral_common writes it."""
    assert check_gguf_tool_prompts(vocab, "v3") == 40
