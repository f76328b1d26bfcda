"""Named chat templates and `get_chat_template`, matching Unsloth's `unsloth.chat_templates.get_chat_template`.

Each template is Jinja written from the model family's published prompt format, reads standard
`{"role", "content"}` messages, and supports `add_generation_prompt`. Every line of template source starts with
`{%-` or `{{-`, so whitespace between tags never leaks into the text whatever the Jinja settings (transformers,
vLLM, llama.cpp).

`get_chat_template` composes a short prelude with the template body:
- `mapping` (Unsloth's `{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}`) rewrites
  ShareGPT-style messages into role/content form inside the template, so `tokenizer.apply_chat_template` takes
  ShareGPT rows directly (standard role/content messages keep working too);
- `system_message` (or the family's default, e.g. Qwen2.5's "You are Qwen, created by Alibaba Cloud...") becomes
  `default_system_message`, rendered when a conversation has no system turn.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

from fastlm.errors import ConfigError, Problem, ProblemList


@dataclass(frozen=True)
class ChatTemplate:
    """One named prompt format.

    `stop_token` is the end-of-turn marker; None means the template ends turns with the tokenizer's own
    `eos_token`. `instruction_part` / `response_part` start a user / assistant turn (for response-only loss).
    """

    name: str
    body: str
    stop_token: str | None
    instruction_part: str
    response_part: str
    default_system: str = ""
    aliases: tuple[str, ...] = ()


def _jinja(src: str) -> str:
    """Joins indented template lines; each must start with `{%-` or `{{-` so no whitespace reaches the output."""
    lines = [line.strip() for line in src.strip().splitlines() if line.strip()]
    for line in lines:
        assert line.startswith(("{%-", "{{-")), line
    return "".join(lines)


_BOS = "{%- if bos_token %}{{- bos_token }}{%- endif %}\n"
_EOS = "(eos_token or '')"
# the system turn: taken from the conversation, else the default (set by the prelude)
_SYSTEM = """
{%- if messages | length > 0 and messages[0]['role'] == 'system' %}
  {%- set system_message = messages[0]['content'] %}
  {%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set system_message = default_system_message %}
  {%- set loop_messages = messages %}
{%- endif %}
"""


def _role_error(allowed: str) -> str:
    return ("{{- raise_exception('This chat template supports the roles " + allowed + ", not ' + message['role']"
            " + '. Fix: map it with standardize_data_formats(..., aliases_for_user=[...]) or get_chat_template("
            "mapping=...)') }}")


_CHATML_BODY = _SYSTEM + """
{%- if system_message %}{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{%- endif %}
{%- for message in loop_messages %}
  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Qwen3: assistant turns after the last user turn keep their <think> block (the last one always gets one, empty
# when there is no reasoning); earlier turns drop it. enable_thinking=False pre-fills an empty block.
_QWEN3_BODY = _SYSTEM + """
{%- if system_message %}{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in loop_messages %}
  {%- if message['role'] == 'assistant' %}
    {%- set content = message['content'] %}
    {%- set reasoning = '' %}
    {%- if message['reasoning_content'] is string %}
      {%- set reasoning = message['reasoning_content'] %}
    {%- elif '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
      {%- set content = content.split('</think>')[-1] %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
      {{- content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- else %}
      {{- '<|im_start|>assistant\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- endif %}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

_LLAMA3_BODY = _BOS + _SYSTEM + """
{%- if system_message %}
  {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message | trim + '<|eot_id|>' }}
{%- endif %}
{%- for message in loop_messages %}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

# Gemma 3 style: no system role; the system text opens the first user turn; the assistant is "model".
_GEMMA_BODY = _BOS + _SYSTEM + """
{%- for message in loop_messages %}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
  {%- if role not in ['user', 'model'] %}""" + _role_error("user, assistant (model), and a leading system") + """
  {%- endif %}
  {%- set content = message['content'] | trim %}
  {%- if loop.first and system_message %}{%- set content = system_message + '\\n\\n' + content %}{%- endif %}
  {{- '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}
"""

# Mistral Instruct v0.3: "[INST] user[/INST] answer</s>"; the system text opens the first user turn.
_MISTRAL_BODY = _BOS + _SYSTEM + """
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}
    {%- set content = message['content'] %}
    {%- if loop.first and system_message %}{%- set content = system_message + '\\n\\n' + content %}{%- endif %}
    {{- '[INST] ' + content + '[/INST]' }}
  {%- elif message['role'] == 'assistant' %}
    {{- ' ' + message['content'] | trim + """ + _EOS + """ }}
  {%- else %}""" + _role_error("user, assistant and a leading system") + """
  {%- endif %}
{%- endfor %}
"""

_PHI3_BODY = _SYSTEM + """
{%- if system_message %}{{- '<|system|>\\n' + system_message + '<|end|>\\n' }}{%- endif %}
{%- for message in loop_messages %}
  {%- if message['role'] in ['system', 'user', 'assistant'] %}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}
  {%- else %}""" + _role_error("system, user, assistant") + """
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}
"""

_ZEPHYR_BODY = _SYSTEM + """
{%- if system_message %}{{- '<|system|>\\n' + system_message + """ + _EOS + """ + '\\n' }}{%- endif %}
{%- for message in loop_messages %}
  {%- if message['role'] in ['system', 'user', 'assistant'] %}
    {{- '<|' + message['role'] + '|>\\n' + message['content'] + """ + _EOS + """ + '\\n' }}
  {%- else %}""" + _role_error("system, user, assistant") + """
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}
"""

_ALPACA_BODY = _SYSTEM + """
{%- if system_message %}{{- system_message + '\\n\\n' }}{%- endif %}
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}
    {{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}
  {%- elif message['role'] == 'assistant' %}
    {{- '### Response:\\n' + message['content'] + """ + _EOS + """ + '\\n\\n' }}
  {%- else %}""" + _role_error("user, assistant and a leading system") + """
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}
"""

# FastChat's vicuna_v1.1: "SYSTEM USER: hi ASSISTANT: hello</s>USER: ..."; the prompt ends with "ASSISTANT:".
_VICUNA_BODY = _SYSTEM + """
{%- if system_message %}{{- system_message + ' ' }}{%- endif %}
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}
    {{- 'USER: ' + message['content'] + ' ' }}
  {%- elif message['role'] == 'assistant' %}
    {{- 'ASSISTANT: ' + message['content'] + """ + _EOS + """ }}
  {%- else %}""" + _role_error("user, assistant and a leading system") + """
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}
"""

_TEMPLATES: tuple[ChatTemplate, ...] = (
    ChatTemplate("chatml", _jinja(_CHATML_BODY), "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n"),
    ChatTemplate("llama-3", _jinja(_LLAMA3_BODY), "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 aliases=("llama3", "llama-3.1", "llama-31", "llama-3.2", "llama-3.3")),
    ChatTemplate("qwen-2.5", _jinja(_CHATML_BODY), "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n",
                 default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                 aliases=("qwen2.5", "qwen-25", "qwen-2", "qwen2")),
    ChatTemplate("qwen3", _jinja(_QWEN3_BODY), "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n",
                 aliases=("qwen-3",)),
    ChatTemplate("gemma", _jinja(_GEMMA_BODY), "<end_of_turn>", "<start_of_turn>user\n", "<start_of_turn>model\n",
                 aliases=("gemma-2", "gemma2", "gemma-3", "gemma3")),
    ChatTemplate("mistral", _jinja(_MISTRAL_BODY), None, "[INST]", "[/INST]"),
    ChatTemplate("phi-3", _jinja(_PHI3_BODY), "<|end|>", "<|user|>\n", "<|assistant|>\n",
                 aliases=("phi3", "phi-3.5", "phi-35", "phi3.5")),
    ChatTemplate("alpaca", _jinja(_ALPACA_BODY), None, "### Instruction:\n", "### Response:\n",
                 default_system="Below is an instruction that describes a task. Write a response that "
                                "appropriately completes the request."),
    ChatTemplate("zephyr", _jinja(_ZEPHYR_BODY), None, "<|user|>\n", "<|assistant|>\n"),
    ChatTemplate("vicuna", _jinja(_VICUNA_BODY), None, "USER:", "ASSISTANT:",
                 default_system="A chat between a curious user and an artificial intelligence assistant. The "
                                "assistant gives helpful, detailed, and polite answers to the user's questions."),
)
_BY_NAME: dict[str, ChatTemplate] = {}
for _t in _TEMPLATES:
    for _n in (_t.name, *_t.aliases):
        _BY_NAME[_n] = _t

CHAT_TEMPLATES: tuple[str, ...] = tuple(_BY_NAME)
"""Every accepted template name, canonical names and aliases."""

_MAPPING_KEYS = ("role", "content", "user", "assistant", "system")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _looks_like_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def _names_listing() -> str:
    return ", ".join(f"{t.name}" + (f" (aliases {', '.join(t.aliases)})" if t.aliases else "") for t in _TEMPLATES)


def lookup_chat_template(name: str) -> ChatTemplate:
    """The `ChatTemplate` for a name or alias (case and `_`/`-` insensitive); ConfigError listing the names."""
    found = _BY_NAME.get(_normalize(name)) if isinstance(name, str) else None
    if found is None:
        problems = ProblemList("chat template")
        problems.add("chat_template", name, f"known names are {_names_listing()}",
                     "pass one of these names, a Jinja template string, or a (template, eos_token) tuple")
        problems.raise_if_any()
    return found


def template_markers(name) -> tuple[str, str]:
    """(instruction_part, response_part): the text that opens a user turn and an assistant turn.

    `name` is a template name, or a tokenizer that went through `get_chat_template` with a named template. These
    are the strings Unsloth's `train_on_responses_only(instruction_part=..., response_part=...)` expects.
    """
    if not isinstance(name, str):
        tokenizer, name = name, getattr(name, "_fastlm_chat_template", None)
        if name is None:
            raise ConfigError("template_markers", [Problem(
                "tokenizer", type(tokenizer).__name__, "a template name, or a tokenizer given a named template by "
                "get_chat_template", "pass the template name, e.g. template_markers('chatml')")])
    template = lookup_chat_template(name)
    return template.instruction_part, template.response_part


def _jinja_string(value: str) -> str:
    """A Jinja string literal for `value` (Jinja decodes Python-style escapes, as json.dumps writes them)."""
    return json.dumps(value, ensure_ascii=False)


def _mapping_prelude(mapping: dict) -> str:
    """Jinja that rewrites `messages` from mapped keys/role names (ShareGPT) into role/content messages."""
    def names(role: str) -> str:  # the role's own name plus the mapped alias(es), as a Jinja list
        value = mapping.get(role, role)
        values = [value] if isinstance(value, str) else list(value)
        return json.dumps(sorted(set(values) | {role}), ensure_ascii=False)

    role_key = _jinja_string(mapping.get("role", "role"))
    content_key = _jinja_string(mapping.get("content", "content"))
    return _jinja(f"""
{{%- set _ns = namespace(messages=[]) %}}
{{%- for m in messages %}}
  {{%- set r = m[{role_key}] if {role_key} in m and m[{role_key}] is not none else m['role'] %}}
  {{%- set c = m[{content_key}] if {content_key} in m and m[{content_key}] is not none else m['content'] %}}
  {{%- if r in {names('user')} %}}{{%- set r = 'user' %}}
  {{%- elif r in {names('assistant')} %}}{{%- set r = 'assistant' %}}
  {{%- elif r in {names('system')} %}}{{%- set r = 'system' %}}
  {{%- endif %}}
  {{%- set _msg = {{'role': r, 'content': c}} %}}
  {{%- if 'reasoning_content' in m %}}
    {{%- set _msg = {{'role': r, 'content': c, 'reasoning_content': m['reasoning_content']}} %}}
  {{%- endif %}}
  {{%- set _ns.messages = _ns.messages + [_msg] %}}
{{%- endfor %}}
{{%- set messages = _ns.messages %}}
""")


def build_chat_template(chat_template="chatml", mapping: dict | None = None,
                        system_message: str | None = None) -> tuple[str, str | None]:
    """(Jinja source, end-of-turn token or None) for a name, a raw Jinja string, or a (template, eos_token) tuple.

    Does not touch any tokenizer; `get_chat_template` installs the result. For a tuple, an eos_token of
    "eos_token" (Unsloth's spelling) or None means "the tokenizer's own eos_token".
    """
    problems = ProblemList("get_chat_template")
    if mapping is not None:
        if not isinstance(mapping, dict):
            problems.add("mapping", mapping, "a dict like {'role': 'from', 'content': 'value', 'user': 'human', "
                         "'assistant': 'gpt'}", "pass a dict")
        else:
            for key in mapping:
                if key not in _MAPPING_KEYS:
                    problems.add(f"mapping[{key!r}]", mapping[key], f"keys are {', '.join(_MAPPING_KEYS)}",
                                 "remove or rename the key")
    stop_token: str | None
    default_system = ""
    if isinstance(chat_template, (tuple, list)) and len(chat_template) == 2:
        body, stop_token = chat_template
        stop_token = None if stop_token in (None, "eos_token") else stop_token
        named = False
    elif isinstance(chat_template, str) and _looks_like_jinja(chat_template):
        body, stop_token, named = chat_template, None, False
    else:
        template = lookup_chat_template(chat_template)
        body, stop_token, default_system, named = template.body, template.stop_token, template.default_system, True
    if not isinstance(body, str) or not _looks_like_jinja(body):
        problems.add("chat_template", chat_template, "a template name, a Jinja string, or a (Jinja string, "
                     "eos_token) tuple", f"use one of the names: {', '.join(t.name for t in _TEMPLATES)}")
    if system_message is not None and not named and "default_system_message" not in body:
        problems.add("system_message", system_message, "only for named templates, or custom templates that read "
                     "the variable default_system_message", "put a system turn in the conversations instead")
    problems.raise_if_any()

    system = default_system if system_message is None else system_message
    prelude = ""
    if mapping:
        prelude += _mapping_prelude(mapping)
    if named or system_message is not None:
        prelude += "{%- set default_system_message = " + _jinja_string(system) + " %}"
    return prelude + body, stop_token


def get_chat_template(tokenizer, chat_template="chatml", mapping: dict | None = None, map_eos_token: bool = True,
                      system_message: str | None = None):
    """Installs a chat template on `tokenizer` and returns the same tokenizer (Unsloth's `get_chat_template`).

    chat_template: a name from `CHAT_TEMPLATES` ("chatml", "llama-3", "qwen-2.5", "qwen3", "gemma", "mistral",
        "phi-3", "alpaca", "zephyr", "vicuna" and aliases), a raw Jinja string, or a (Jinja, eos_token) tuple.
    mapping: e.g. {"role": "from", "content": "value", "user": "human", "assistant": "gpt"} so the template reads
        ShareGPT messages directly; role/content messages still render.
    map_eos_token: make the template's end-of-turn marker (e.g. "<|im_end|>", "<|eot_id|>", "<end_of_turn>") the
        tokenizer's `eos_token`, so generation stops at the end of a turn and SFT teaches the model to emit it.
        If the marker is not in the vocabulary it is ADDED as a special token: the caller must then resize the
        model's embeddings (`model.resize_token_embeddings(len(tokenizer))`); the added tokens are listed in
        `tokenizer._fastlm_added_tokens`. Unlike Unsloth, which renames the old eos entry in the vocabulary.
        Templates that end turns with the tokenizer's own eos (mistral, alpaca, zephyr, vicuna) change nothing.
    system_message: the system prompt used when a conversation has none (replaces the family default, e.g.
        Qwen2.5's "You are Qwen, ..."; alpaca's and vicuna's preambles).

    The chosen name is kept in `tokenizer._fastlm_chat_template` (None for custom templates), the end-of-turn
    marker in `tokenizer._fastlm_stop_token`; `template_markers(tokenizer)` reads the former.
    """
    source, stop_token = build_chat_template(chat_template, mapping=mapping, system_message=system_message)
    inner = getattr(tokenizer, "tokenizer", None) or tokenizer  # processors wrap a tokenizer
    if stop_token is None and inner.eos_token is None:
        problems = ProblemList("get_chat_template")
        problems.add("tokenizer.eos_token", None, "this template ends turns with the tokenizer's eos_token",
                     "set one first: tokenizer.add_special_tokens({'eos_token': '</s>'})")
        problems.raise_if_any()
    if stop_token is not None:
        in_vocab = stop_token in inner.get_vocab()
        if map_eos_token:
            if inner.eos_token != stop_token:
                size = len(inner)
                inner.add_special_tokens({"eos_token": stop_token})
                if len(inner) > size:
                    added = list(getattr(inner, "_fastlm_added_tokens", []))
                    inner._fastlm_added_tokens = added + [stop_token]
        elif not in_vocab:
            warnings.warn(f"The end-of-turn marker {stop_token!r} of this chat template is not in the tokenizer's "
                          f"vocabulary, so it is split into several tokens and generation will not stop on it. "
                          f"Fix: get_chat_template(..., map_eos_token=True) adds it as the eos token.", stacklevel=2)
    name = lookup_chat_template(chat_template).name if isinstance(chat_template, str) and not \
        _looks_like_jinja(chat_template) else None
    for target in {id(tokenizer): tokenizer, id(inner): inner}.values():
        target.chat_template = source
        target._fastlm_chat_template = name
        target._fastlm_stop_token = stop_token if stop_token is not None else inner.eos_token
        if target is not inner and hasattr(inner, "_fastlm_added_tokens"):
            target._fastlm_added_tokens = inner._fastlm_added_tokens
    return tokenizer


def install_chat_template(model, tokenizer, chat_template="chatml", **kwargs):
    """`get_chat_template` for a loaded model: installs the template and grows the model's embeddings when the
    template added tokens (its end-of-turn marker). Returns the tokenizer."""
    tokenizer = get_chat_template(tokenizer, chat_template, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer
