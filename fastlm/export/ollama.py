"""An Ollama `Modelfile` beside a GGUF export: FROM the file, the chat template as an Ollama (Go) template for the
known template families, the default system prompt the Jinja template inserts, and stop tokens (EOS and the end of
a turn) so generation stops."""
from __future__ import annotations

from pathlib import Path

from .model_files import stop_token_ids

# family -> (marker in the Jinja template, Ollama template)
GO_TEMPLATES = {
    "chatml": ("<|im_start|>", (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n")),
    "llama3": ("<|start_header_id|>", (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    "gemma": ("<start_of_turn>", (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")),
    "phi3": ("<|assistant|>", (
        "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n")),
}


def template_family(jinja: str | None) -> str | None:
    if not jinja:
        return None
    for name, (marker, _) in GO_TEMPLATES.items():
        if marker in jinja:
            return name
    return None


def default_system_prompt(tokenizer, family: str | None) -> str | None:
    """The system message the Jinja template adds when the conversation has none (e.g. SmolLM2's)."""
    if family != "chatml":
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head): text.index("<|im_end|>")]
    return None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, tokenizer, config=None) -> str:
    from .gguf.vocab import chat_template_of

    jinja = chat_template_of(tokenizer) if tokenizer is not None else None
    family = template_family(jinja)
    lines = [f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f"TEMPLATE {_quote(GO_TEMPLATES[family][1])}")
        system = default_system_prompt(tokenizer, family)
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
    elif jinja:
        lines.append("# TEMPLATE: Ollama reads the chat template embedded in the GGUF file (tokenizer.chat_template)")
    for tid in stop_token_ids(tokenizer, config):
        token = tokenizer.convert_ids_to_tokens(tid)
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


def write_modelfile(directory: Path, gguf_name: str, tokenizer, config=None) -> Path:
    path = Path(directory) / "Modelfile"
    path.write_text(modelfile_text(gguf_name, tokenizer, config))
    return path
