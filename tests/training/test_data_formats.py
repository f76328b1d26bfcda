"""Dataset shapes: ShareGPT -> role/content, chat-template text, instruction columns -> ShareGPT."""
from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict
from fixtures.tiny import build_tokenizer
from tokenizers import processors

from fastlm.errors import ConfigError
from fastlm.training.chat_templates import get_chat_template
from fastlm.training.data_formats import apply_chat_template, standardize_data_formats, to_sharegpt

SHAREGPT_ROWS = [
    [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    [{"from": "system", "value": "Be brief."}, {"from": "Human", "value": "Capital of France?"},
     {"from": "gpt", "value": "Paris"}],
]
STANDARD_ROWS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}],
]
CHATML_TEXT = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis<|im_end|>\n",
]
ALPACA = {"instruction": ["Add the numbers.", "Say hello.", "Name a colour."],
          "input": ["1 and 2", "", None],
          "output": ["3", "Hello!", "Red"]}


def sharegpt(column="conversations") -> Dataset:
    return Dataset.from_dict({column: SHAREGPT_ROWS, "id": [7, 8]})


def test_sharegpt_becomes_role_content_keeping_other_columns():
    out = standardize_data_formats(sharegpt())
    assert out.column_names == ["conversations", "id"]
    assert out["conversations"][:] == STANDARD_ROWS and out["id"][:] == [7, 8]


def test_messages_column_and_plain_lists_are_converted():
    out = standardize_data_formats(sharegpt("messages"))
    assert out["messages"][:] == STANDARD_ROWS
    rows = standardize_data_formats([{"conversations": c, "id": i} for i, c in enumerate(SHAREGPT_ROWS)])
    assert [r["conversations"] for r in rows] == STANDARD_ROWS and rows[1]["id"] == 1


def test_already_standard_data_is_returned_untouched():
    data = Dataset.from_dict({"messages": STANDARD_ROWS})
    assert standardize_data_formats(data) is data


def test_dataset_dict_is_converted_split_by_split():
    out = standardize_data_formats(DatasetDict(train=sharegpt(), test=sharegpt()))
    assert out["test"]["conversations"][:] == STANDARD_ROWS


def test_unknown_role_names_the_role_and_the_fix():
    data = Dataset.from_dict({"conversations": [[{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]]})
    with pytest.raises(ConfigError) as info:
        standardize_data_formats(data)
    message = str(info.value)
    assert "'bot'" in message and "row 0, message 1" in message and "aliases_for_assistant=[..., 'bot']" in message
    assert "['gpt', 'assistant', 'output', 'model']" in message
    fixed = standardize_data_formats(data, aliases_for_assistant=["gpt", "bot"])
    assert fixed["conversations"][0][1] == {"role": "assistant", "content": "Yo"}


def test_no_conversation_column_points_to_to_sharegpt():
    with pytest.raises(ConfigError, match="to_sharegpt"):
        standardize_data_formats(Dataset.from_dict(ALPACA))


def test_apply_chat_template_renders_text_without_generation_prompt():
    tok = build_tokenizer()
    out = apply_chat_template(standardize_data_formats(sharegpt()), tok)
    assert out["text"][:] == CHATML_TEXT and "conversations" in out.column_names
    direct = apply_chat_template(sharegpt(), tok)  # ShareGPT rows are converted on the fly
    assert direct["text"][:] == CHATML_TEXT


def test_apply_chat_template_with_a_named_template_leaves_the_tokenizer_alone():
    tok = build_tokenizer()
    before = tok.chat_template
    out = apply_chat_template(sharegpt(), tok, chat_template="llama-3")
    assert out["text"][0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")
    assert tok.chat_template == before and tok.eos_token == "<|im_end|>"


def test_apply_chat_template_drops_a_messages_column_that_trl_would_prefer():
    tok = build_tokenizer()
    out = apply_chat_template(Dataset.from_dict({"messages": STANDARD_ROWS}), tok)
    assert out.column_names == ["text"] and out["text"][:] == CHATML_TEXT
    kept = apply_chat_template(Dataset.from_dict({"messages": STANDARD_ROWS}), tok, remove_conversation_column=False)
    assert kept.column_names == ["messages", "text"]


def test_apply_chat_template_strips_a_bos_the_tokenizer_adds_itself():
    tok = get_chat_template(build_tokenizer(), "gemma")
    tok.add_special_tokens({"bos_token": "<bos>"})
    rows = Dataset.from_dict({"conversations": STANDARD_ROWS[:1]})
    assert apply_chat_template(rows, tok)["text"][0].startswith("<bos><start_of_turn>user")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    text = apply_chat_template(rows, tok)["text"][0]
    assert text.startswith("<start_of_turn>user\nHi")
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 1


def test_apply_chat_template_without_a_template_says_how_to_get_one():
    with pytest.raises(ConfigError, match="get_chat_template"):
        apply_chat_template(sharegpt(), build_tokenizer(chat_template=False))


def test_to_sharegpt_merges_columns_with_optional_sections():
    out = to_sharegpt(Dataset.from_dict(ALPACA))
    assert out.column_names == ["conversations"]
    convs = out["conversations"][:]
    assert convs[0] == [{"from": "human", "value": "Add the numbers.\nYour input is:\n1 and 2"},
                        {"from": "gpt", "value": "3"}]
    assert convs[1][0]["value"] == "Say hello." and convs[2][0]["value"] == "Name a colour."  # "" and None drop
    custom = to_sharegpt(Dataset.from_dict(ALPACA), merged_prompt="{{Task}} {instruction}[[ ({input})]] done",
                         remove_unused_columns=False)
    assert custom["conversations"][0][0]["value"] == "{Task} Add the numbers. (1 and 2) done"
    assert custom["conversations"][1][0]["value"] == "{Task} Say hello. done"
    assert set(custom.column_names) == {"instruction", "input", "output", "conversations"}


def test_to_sharegpt_conversation_extension_merges_rows():
    first = to_sharegpt(Dataset.from_dict(ALPACA), conversation_extension=3)
    again = to_sharegpt(Dataset.from_dict(ALPACA), conversation_extension=3)
    convs = first["conversations"][:]
    assert len(convs) == 3 and all(len(c) == 6 for c in convs)
    assert [[m["from"] for m in c] for c in convs] == [["human", "gpt"] * 3] * 3
    for i, conv in enumerate(convs):
        assert conv[1]["value"] == ALPACA["output"][i]  # each row opens with its own turn
        assert ALPACA["output"][i] not in (conv[3]["value"], conv[5]["value"])  # then other rows
    assert again["conversations"][:] == convs  # seeded
    as_list = to_sharegpt([dict(zip(ALPACA, v)) for v in zip(*ALPACA.values())], conversation_extension=3)
    assert [r["conversations"] for r in as_list] == convs


def test_to_sharegpt_reports_every_problem_with_the_columns():
    with pytest.raises(ConfigError) as info:
        to_sharegpt(Dataset.from_dict(ALPACA), merged_prompt="{instruction} {context}[[ {input}",
                    output_column_name="answer", conversation_extension=0)
    message = str(info.value)
    assert "4 problems" in message and "{context}" in message and "'answer'" in message
    assert "no closing ]]" in message and "['instruction', 'input', 'output']" in message
    with pytest.raises(ConfigError, match="at least one column"):
        to_sharegpt(Dataset.from_dict(ALPACA), merged_prompt="no columns here")


def test_pipeline_instruction_columns_to_training_text():
    tok = get_chat_template(build_tokenizer(), "chatml")
    data = apply_chat_template(standardize_data_formats(to_sharegpt(Dataset.from_dict(ALPACA))), tok)
    assert data["text"][1] == ("<|im_start|>user\nSay hello.<|im_end|>\n"
                               "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_standardize_with_a_tokenizer_checks_the_template_renders_the_data():
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    data = Dataset.from_list([{"conversations": [{"from": "system", "value": "Be brief."},
                                                 {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    with pytest.raises(ConfigError, match="System role not supported.*get_chat_template"):
        standardize_data_formats(data, tokenizer=tok)
    ok = standardize_data_formats(data, tokenizer=build_tokenizer())
    assert ok[0]["conversations"][0] == {"role": "system", "content": "Be brief."}
