"""Named chat templates: exact rendering per family, generation prompts, eos mapping, mapping, system prompts."""
from __future__ import annotations

import warnings

import pytest
from fixtures.tiny import build_tokenizer
from transformers import AutoTokenizer

from fastlm.errors import ConfigError, FastLMError
from fastlm.training.chat_templates import CHAT_TEMPLATES, get_chat_template, template_markers

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]
SHAREGPT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
CANONICAL = ["chatml", "llama-3", "qwen-2.5", "qwen3", "gemma", "mistral", "phi-3", "alpaca", "zephyr", "vicuna"]

# {B} = the tokenizer's bos_token, {E} = its eos_token after get_chat_template
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello<|im_end|>\n",
    "llama-3": "{B}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
    "qwen-2.5": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello<|im_end|>\n",
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n",
    "gemma": "{B}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n",
    "mistral": "{B}[INST] Be brief.\n\nHi[/INST] Hello{E}",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello{E}\n\n",
    "zephyr": "<|system|>\nBe brief.{E}\n<|user|>\nHi{E}\n<|assistant|>\nHello{E}\n",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello{E}",
}
GENERATION_HEADER = {
    "chatml": "<|im_start|>assistant\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen-2.5": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n", "gemma": "<start_of_turn>model\n",
    "mistral": "", "phi-3": "<|assistant|>\n", "alpaca": "### Response:\n", "zephyr": "<|assistant|>\n",
    "vicuna": "ASSISTANT:",
}


def render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("name", CANONICAL)
def test_two_turn_conversation_renders_exact_format(name):
    tok = get_chat_template(build_tokenizer(), name)
    expected = EXPECTED[name].replace("{B}", tok.bos_token).replace("{E}", tok.eos_token)
    assert render(tok, CONVERSATION) == expected


@pytest.mark.parametrize("name", CANONICAL)
def test_generation_prompt_appends_assistant_header(name):
    tok = get_chat_template(build_tokenizer(), name)
    user_only = CONVERSATION[:2]
    without = render(tok, user_only)
    with_prompt = render(tok, user_only, add_generation_prompt=True)
    assert with_prompt == without + GENERATION_HEADER[name]
    assert with_prompt.endswith(template_markers(name)[1])


@pytest.mark.parametrize("name", CANONICAL)
def test_markers_open_user_then_assistant_turns(name):
    tok = get_chat_template(build_tokenizer(), name)
    text = render(tok, CONVERSATION + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Ok"}])
    instruction, response = template_markers(name)
    assert template_markers(tok) == (instruction, response)
    assert text.count(instruction) == 2 and text.count(response) == 2
    assert text.index(instruction) < text.index(response) < text.rindex(instruction) < text.rindex(response)


@pytest.mark.parametrize("name,stop", [("llama-3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("phi-3", "<|end|>")])
def test_map_eos_token_adds_the_end_of_turn_marker_as_one_token(name, stop):
    tok = build_tokenizer()
    size = len(tok)
    assert get_chat_template(tok, name) is tok
    assert tok.eos_token == stop
    assert len(tok.encode(stop, add_special_tokens=False)) == 1
    assert tok.eos_token_id == tok.convert_tokens_to_ids(stop) == size  # appended: resize embeddings to len(tok)
    assert tok._fastlm_added_tokens == [stop] and len(tok) == size + 1
    get_chat_template(tok, name)  # idempotent
    assert tok._fastlm_added_tokens == [stop] and len(tok) == size + 1


def test_map_eos_token_reuses_a_marker_already_in_the_vocab():
    tok = build_tokenizer()
    size = len(tok)
    get_chat_template(tok, "chatml")
    assert tok.eos_token == "<|im_end|>" and len(tok) == size
    assert not getattr(tok, "_fastlm_added_tokens", [])


def test_without_map_eos_token_the_eos_stays_and_a_missing_marker_warns():
    tok = build_tokenizer()
    with pytest.warns(UserWarning, match="map_eos_token=True"):
        get_chat_template(tok, "llama-3", map_eos_token=False)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 320


@pytest.mark.parametrize("alias,canonical", [("llama3", "llama-3"), ("llama-3.1", "llama-3"), ("Qwen2.5", "qwen-2.5"),
                                             ("qwen_2.5", "qwen-2.5"), ("qwen-2", "qwen-2.5"), ("gemma-3", "gemma"),
                                             ("gemma2", "gemma"), ("phi-3.5", "phi-3")])
def test_aliases_give_the_same_template(alias, canonical):
    assert alias.lower() in CHAT_TEMPLATES or alias.lower().replace("_", "-") in CHAT_TEMPLATES
    a = get_chat_template(build_tokenizer(), alias)
    b = get_chat_template(build_tokenizer(), canonical)
    assert a.chat_template == b.chat_template and a._fastlm_chat_template == canonical


def test_unknown_name_lists_every_available_name():
    with pytest.raises(ConfigError) as info:
        get_chat_template(build_tokenizer(), "llama-2")
    assert isinstance(info.value, FastLMError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'llama-2'" in message and "Jinja template string" in message
    for name in CANONICAL:
        assert name in message
    with pytest.raises(ConfigError, match="chatml"):
        template_markers("nope")


def test_mapping_renders_sharegpt_messages_directly():
    tok = get_chat_template(build_tokenizer(), "chatml",
                            mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"})
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert render(tok, SHAREGPT) == expected
    assert render(tok, CONVERSATION[1:]) == expected  # role/content still works
    with pytest.raises(ConfigError, match="speaker"):
        get_chat_template(build_tokenizer(), "chatml", mapping={"speaker": "from"})


def test_system_message_defaults_and_overrides():
    user = CONVERSATION[1:2]
    qwen = get_chat_template(build_tokenizer(), "qwen-2.5")
    assert render(qwen, user).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert "You are Qwen" not in render(qwen, CONVERSATION)  # the conversation's own system turn wins
    odd = 'Say "hi" \\ {{ x }} {% if %} ünï 😀\nline2'
    chatml = get_chat_template(build_tokenizer(), "chatml", system_message=odd)
    assert render(chatml, user) == f"<|im_start|>system\n{odd}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(get_chat_template(build_tokenizer(), "chatml"), user).startswith("<|im_start|>user")
    gemma = get_chat_template(build_tokenizer(), "gemma", system_message="Be kind.")
    assert "<start_of_turn>user\nBe kind.\n\nHi<end_of_turn>" in render(gemma, user)
    alpaca = get_chat_template(build_tokenizer(), "alpaca")
    assert render(alpaca, user).startswith("Below is an instruction that describes a task.")


def test_qwen3_thinking():
    tok = get_chat_template(build_tokenizer(), "qwen3")
    user = [{"role": "user", "content": "Q1"}]
    assert render(tok, user, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert render(tok, user, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = user + [{"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
                      {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2", "reasoning_content": "new reasoning"}]
    text = render(tok, history)
    assert "old reasoning" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nnew reasoning\n</think>\n\nA2<|im_end|>\n")


def test_custom_jinja_string_and_tuple():
    custom = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|my_end|>' }}{% endfor %}"
    tok = get_chat_template(build_tokenizer(), (custom, "<|my_end|>"))
    assert tok.eos_token == "<|my_end|>" and tok._fastlm_added_tokens == ["<|my_end|>"]
    assert render(tok, CONVERSATION[1:]) == "user: Hi<|my_end|>assistant: Hello<|my_end|>"
    raw = get_chat_template(build_tokenizer(), custom)
    assert raw.chat_template == custom and raw.eos_token == "<|im_end|>" and raw._fastlm_chat_template is None
    with pytest.raises(ConfigError, match="default_system_message"):
        get_chat_template(build_tokenizer(), custom, system_message="x")


def test_unsupported_role_names_the_role():
    tok = get_chat_template(build_tokenizer(), "phi-3")
    with pytest.raises(Exception, match="not tool"):
        render(tok, [{"role": "tool", "content": "42"}])


def test_template_and_eos_survive_save_and_reload(tmp_path):
    tok = get_chat_template(build_tokenizer(), "llama-3", system_message="Be brief.")
    tok.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token == "<|eot_id|>"
    assert render(again, CONVERSATION[1:]) == render(tok, CONVERSATION[1:])
    assert "Be brief." in render(again, CONVERSATION[1:2])
