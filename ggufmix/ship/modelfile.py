"""Ollama ``Modelfile`` for a built GGUF: the chat template in Ollama's Go-template syntax and its stops.

Ollama can also take the template from the GGUF (``tokenizer.chat_template``): it matches the Jinja
text against templates it knows. That match fails for edited templates, so where the GGUF's template
belongs to a family below, the Modelfile states the converted TEMPLATE explicitly (and says so in a
comment); otherwise it leaves TEMPLATE out and says that Ollama will read the GGUF's own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    marker: str                # a string only this family's Jinja template contains
    template: str              # Ollama Go template
    stops: tuple[str, ...]
    system_rx: re.Pattern[str] | None  # the template's default system prompt, when it has one


# One line per family; each names the models it is for.
FAMILIES: tuple[TemplateFamily, ...] = (
    # ChatML: Qwen 2/2.5/3, SmolLM2, Hermes, many fine-tunes
    TemplateFamily(
        "chatml", "<|im_start|>",
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        re.compile(r"<\|im_start\|>system(?:\\n|\n)([^<'{}\\]+)<\|im_end\|>|\{\{-?\s*'(You are [^'{}\\]+)'\s*\}\}")),
    # Gemma 2/3: no system role, the system text joins the first user turn
    TemplateFamily(
        "gemma", "<start_of_turn>",
        "{{- if .System }}<start_of_turn>user\n{{ .System }}\n\n{{ end }}"
        "{{- range $i, $m := .Messages }}"
        "{{- if eq $m.Role \"assistant\" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n"
        "{{ else }}{{ if or $i (not $.System) }}<start_of_turn>user\n{{ end }}{{ $m.Content }}<end_of_turn>\n"
        "{{ end }}{{ end }}<start_of_turn>model\n",
        ("<end_of_turn>",),
        None),
    # Llama 3.x instruct
    TemplateFamily(
        "llama3", "<|start_header_id|>",
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
        None),
)


def detect_family(chat_template: str | None) -> TemplateFamily | None:
    """The family of a GGUF's Jinja chat template, or None."""
    if not chat_template:
        return None
    return next((f for f in FAMILIES if f.marker in chat_template), None)


def default_system(family: TemplateFamily, chat_template: str) -> str | None:
    """The system prompt the Jinja template inserts when the conversation has none (SmolLM2, Qwen2.5)."""
    if family.system_rx is None:
        return None
    m = family.system_rx.search(chat_template)
    return next((g for g in m.groups() if g), None) if m else None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot quote {text[:40]!r} for a Modelfile: it contains triple quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, chat_template: str | None, *, num_ctx: int | None = None,
              num_batch: int | None = None, use_mmap: bool | None = None) -> str:
    """The Modelfile text for ``FROM ./<gguf_name>``.

    Args:
        chat_template: the GGUF's ``tokenizer.chat_template`` (None when it has none).
        num_ctx, num_batch, use_mmap: the settings the memory budget was computed for (``--fit``).
    """
    family = detect_family(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        lines.append("# No TEMPLATE: Ollama reads tokenizer.chat_template from the GGUF and matches it to its own"
                     if chat_template else "# The GGUF has no chat template: a completion model, no TEMPLATE")
    else:
        lines += [f"# TEMPLATE converted by ggufmix from the GGUF's chat template ({family.name} family);",
                  "# it is used instead of the Jinja template inside the GGUF.",
                  f"TEMPLATE {_quote(family.template)}"]
        system = default_system(family, chat_template or "")
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
        lines += [f'PARAMETER stop "{s}"' for s in family.stops]
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    if num_batch:
        lines.append(f"PARAMETER num_batch {num_batch}")
    if use_mmap is not None:
        lines.append(f"PARAMETER use_mmap {str(use_mmap).lower()}")
    return "\n".join(lines) + "\n"
