"""The fake Ollama's models: what each one is, and what Ollama says of it.

The fake has no model files, so a model's kind comes from its name: its ``base``, the part
after the last ``/`` and before the ``:``, lowercased.

* A base containing ``embed`` (``nomic-embed-text``, ``mxbai-embed-large``,
  ``snowflake-arctic-embed2``, ``qwen3-embedding``) is an **embedding model**: capabilities
  ``["embedding"]``. It embeds (vectors of :data:`~chatd.dev.fake_ollama.wire.EMBED_DIM`
  values) and refuses chat and generate, as Ollama does a model whose GGUF has a pooling type.
* Any other is a **chat model**: ``["completion", "tools"]``, plus ``"insert"`` when the base
  contains ``coder`` (its template has ``{{ .Suffix }}``: fill-in-the-middle) or else
  ``"thinking"`` when it starts with ``qwen3``, ``deepseek-r1`` or ``gpt-oss``. It refuses
  embeddings (llama-server was started without ``--embeddings``). The fake's replies carry no
  thinking text and no tool calls: those capabilities only decide what it accepts.

Pure builders of the bodies of ``/api/tags``, ``/api/ps``, ``/api/show`` and ``/v1/models``
(field order as Ollama's Go structs), and :func:`refusal`, Ollama's capability checks. Like
the rest of the fake it imports nothing from chatd but its own modules.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from chatd.dev.fake_ollama.wire import _CONTEXT_LENGTH, _MODEL_SIZE, EMBED_DIM, go_quote

_EMBED_SIZE = 274_302_450  # nomic-embed-text's blob
_CHAT_CONTEXT = 32_768  # what a chat model was trained for (its runner uses _CONTEXT_LENGTH)
#: An embedding model's context (nomic-bert's), in tokens, which the fake counts as words: a
#: longer text is cut to it before embedding, or refused with ``truncate: false``.
EMBED_CONTEXT = 2_048
_THINKERS = ("qwen3", "deepseek-r1", "gpt-oss")
_LICENSE = (
    "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n\n"
    "(The fake Ollama's stand-in license text.)"
)
# Go templates as Ollama's library models carry them (abridged ChatML). Ollama derives a
# capability from the variables a template uses: .Suffix is "insert", .Tools is "tools".
_CHAT_TEMPLATE = """{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""
_FIM_TEMPLATE = (
    "{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>\n"
    + _CHAT_TEMPLATE.replace("{{- if .Messages }}", "{{- else if .Messages }}", 1)
)
_THINK_TEMPLATE = _CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{{ end }}\n{{- end }}",
    "<|im_start|>assistant\n{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n"
    "{{ end }}{{ end }}\n{{- end }}",
    1,
)
_EMBED_TEMPLATE = "{{ .Prompt }}"


def base(name: str) -> str:
    """The model's own name: after the last ``/``, before the ``:``, lowercased."""
    return name.rsplit("/", 1)[-1].partition(":")[0].lower()


def capabilities(name: str) -> list[str]:
    """Ollama's capabilities of the model ``name``, by the naming rule of this module."""
    b = base(name)
    if "embed" in b:
        return ["embedding"]
    caps = ["completion", "tools"]
    if "coder" in b:
        caps.append("insert")
    elif b.startswith(_THINKERS):
        caps.append("thinking")
    return caps


def is_embedding(name: str) -> bool:
    return "embed" in base(name)


def full_name(name: str) -> str:
    """Ollama's full model name (``registry.ollama.ai/library/qwen2.5:7b``), as its capability
    errors show it."""
    parts = name.split("/")
    model = parts[-1] if ":" in parts[-1] else f"{parts[-1]}:latest"
    if len(parts) == 1:
        return f"registry.ollama.ai/library/{model}"
    if len(parts) == 2:
        return f"registry.ollama.ai/{parts[0]}/{model}"
    return "/".join([*parts[:-1], model])


def shortest(name: str) -> str:
    """Ollama's DisplayShortest: the name without the default host and namespace, with a
    tag (``:latest`` when none)."""
    full = full_name(name)
    return full.removeprefix("registry.ollama.ai/").removeprefix("library/")


def owned_by(name: str) -> str:
    """The namespace OpenAI's ``owned_by`` shows (``library`` for Ollama's own models)."""
    return full_name(name).split("/")[-2]


def _family(name: str) -> str:
    b = base(name)
    if "embed" in b:
        return "nomic-bert" if b.startswith("nomic") else "bert"
    fam = re.match(r"[a-z]+\d*", b)
    return fam.group(0) if fam else "llama"


def _parameters(name: str) -> tuple[str, int]:
    """The model's parameter size as Ollama shows it ("7B") and its parameter count."""
    size = re.search(r"(\d+(?:\.\d+)?)([bm])", name.partition(":")[2].lower())
    if size:
        n = float(size.group(1)) * (1e9 if size.group(2) == "b" else 1e6)
        return f"{size.group(1)}{size.group(2).upper()}", int(n)
    if is_embedding(name):
        return "137M", 136_727_040
    return "7B", 7_615_616_512


def details(name: str) -> dict[str, Any]:
    """Ollama's ModelDetails."""
    family = _family(name)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _parameters(name)[0],
        "quantization_level": "F16" if is_embedding(name) else "Q4_K_M",
    }


def size(name: str) -> int:
    return _EMBED_SIZE if is_embedding(name) else _MODEL_SIZE


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_entry(name: str) -> dict[str, Any]:
    """The head every model listing shares: name, model, size, digest, details."""
    return {
        "name": name,
        "model": name,
        "size": size(name),
        "digest": _digest(name),
        "details": details(name),
    }


def tags_entry(name: str, modified_at: str) -> dict[str, Any]:
    """One model of ``GET /api/tags`` (ListModelResponse, with v0.12+'s capabilities)."""
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": size(name),
        "digest": _digest(name),
        "details": details(name),
        "capabilities": capabilities(name),
    }


def model_info(name: str) -> dict[str, Any]:
    """A GGUF's metadata as ``/api/show`` gives it (a few of its keys)."""
    arch = _family(name)
    embed = is_embedding(name)
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.file_type": 1 if embed else 15,
        "general.parameter_count": _parameters(name)[1],
        "general.quantization_version": 2,
        f"{arch}.context_length": EMBED_CONTEXT if embed else _CHAT_CONTEXT,
    }
    if embed:
        info[f"{arch}.embedding_length"] = EMBED_DIM
        info[f"{arch}.pooling_type"] = 1
    info["tokenizer.ggml.model"] = "bert" if embed else "gpt2"
    return info


def _template(name: str) -> str:
    caps = capabilities(name)
    if "embedding" in caps:
        return _EMBED_TEMPLATE
    if "insert" in caps:
        return _FIM_TEMPLATE
    return _THINK_TEMPLATE if "thinking" in caps else _CHAT_TEMPLATE


def _options(name: str) -> list[tuple[str, int | str]]:
    if is_embedding(name):
        return [("num_ctx", _CONTEXT_LENGTH)]
    return [("num_ctx", _CONTEXT_LENGTH), ("stop", "<|im_start|>"), ("stop", "<|im_end|>")]


def _modelfile_quote(s: str) -> str:
    """Ollama's Modelfile quoting (parser.quote)."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def show(name: str, modified_at: str) -> dict[str, Any]:
    """``POST /api/show``'s ShowResponse for the known model ``name`` (non-verbose: no
    tensors)."""
    opts = _options(name)
    # Ollama: fmt.Sprintf("%-*s %#v", 30, k, v): the value in Go syntax (a string quoted).
    params = [f"{k:<30} {go_quote(v) if isinstance(v, str) else v}" for k, v in opts]
    template = _template(name)
    modelfile = "".join(
        [
            '# Modelfile generated by "ollama show"\n',
            "# To build a new Modelfile based on this, replace FROM with:\n",
            f"# FROM {shortest(name)}\n\n",
            f"FROM /root/.ollama/models/blobs/sha256-{_digest(name)}\n",
            f"TEMPLATE {_modelfile_quote(template)}\n",
            *[f"PARAMETER {k} {_modelfile_quote(str(v))}\n" for k, v in opts],
            f"LICENSE {_modelfile_quote(_LICENSE)}\n",
        ]
    )
    return {
        "license": _LICENSE,
        "modelfile": modelfile,
        "parameters": "\n".join(params),
        "template": template,
        "details": details(name),
        "model_info": model_info(name),
        "capabilities": capabilities(name),
        "modified_at": modified_at,
    }


def v1_model(model_id: str, created: int) -> dict[str, Any]:
    """An OpenAI model object (``/v1/models``, ``/v1/models/{id}``)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by(model_id)}


def refusal(api: str, body: dict[str, Any], key: str) -> str | None:
    """Ollama's 400 text when the known model ``key`` cannot serve the generation request
    ``body`` sent to ``api`` (``chat``, ``generate``, ``openai`` or ``completions``), in
    Ollama's order: raw with a template/system/context, ``think`` on a model without thinking,
    an embedding model asked to chat or generate, ``suffix`` on a model without insert."""
    caps = capabilities(key)
    model = go_quote(body["model"])
    raw_extras = body.get("template") or body.get("system") or body.get("context")
    if api == "generate" and body.get("raw") is True and raw_extras:
        return "raw mode does not support template, system, or context"
    think = body.get("think") if api in ("chat", "generate") else None
    if think is not None and think is not False and "thinking" not in caps:
        return f"{model} does not support thinking"
    if "completion" not in caps:
        return f"{model} does not support {'chat' if api in ('chat', 'openai') else 'generate'}"
    if api in ("generate", "completions") and body.get("suffix") and "insert" not in caps:
        return f"{full_name(key)} does not support insert"
    return None
