"""fix_untrained_tokens: zero rows of tokens the data uses get the mean embedding; unused zero rows stay zero."""
from __future__ import annotations

import logging

import pytest
import torch

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from fixtures.tiny import build_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm.training.untrained_tokens import fix_untrained_tokens  # noqa: E402

LOGGER = "fastlm.training.untrained_tokens"
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]


@pytest.fixture
def setup(tiny_llama_dir):
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dataset = datasets.Dataset.from_list([{"input_ids": ids}] * 3)
    used_word = next(i for i in ids if i > 2)  # a plain word token the data uses
    unused = next(i for i in range(len(tok)) if i not in set(ids) and i > 2)
    return tok, model, dataset, used_word, unused


def test_used_zero_rows_set_to_mean_unused_left_alone(setup, caplog):
    tok, model, dataset, used_word, unused = setup
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr()  # untied: both matrices are checked
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        embed[im_start] = 0
        head[used_word] = 0  # untrained in lm_head only: the token is still fixed in both
        embed[unused] = 0
        head[unused] = 0
    untrained = torch.zeros(embed.shape[0], dtype=torch.bool)
    untrained[[im_start, used_word, unused]] = True
    embed_mean = embed[~untrained].float().mean(0)
    head_mean = head[~untrained].float().mean(0)
    before_other = embed[5].clone()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fixed = fix_untrained_tokens(model, tok, dataset)

    assert fixed == sorted([im_start, used_word])
    for i in fixed:
        torch.testing.assert_close(embed[i], embed_mean)
        torch.testing.assert_close(head[i], head_mean)
    assert embed[unused].abs().max() == 0 and head[unused].abs().max() == 0
    assert torch.equal(embed[5], before_other)
    notice = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(notice) == 1
    assert "2 tokens" in notice[0] and "<|im_start|>" in notice[0] and "mean" in notice[0]


def test_peft_wrapped_model_with_trained_embedding_copy(setup):
    tok, model, dataset, _, unused = setup
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.get_input_embeddings().weight[im_end] = 0
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"],
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    wrapper = peft_model.get_input_embeddings()
    assert hasattr(wrapper, "original_module")  # embed_tokens is wrapped by PEFT's ModulesToSaveWrapper

    fixed = fix_untrained_tokens(peft_model, tok, dataset)

    assert fixed == [im_end]
    original = wrapper.original_module.weight
    copy = wrapper.modules_to_save["default"].weight
    for weight in (original, copy):
        assert weight[im_end].abs().max() > 0
        torch.testing.assert_close(weight[im_end], weight[torch.arange(weight.shape[0]) != im_end].mean(0))


def test_without_dataset_only_special_tokens_are_fixed(setup):
    tok, model, _, used_word, _ = setup
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.get_input_embeddings().weight[[im_end, used_word]] = 0
    assert fix_untrained_tokens(model, tok) == [im_end]
    assert model.get_input_embeddings().weight[used_word].abs().max() == 0


def test_nothing_untrained_changes_nothing(setup, caplog):
    tok, model, dataset, _, _ = setup
    before = model.get_input_embeddings().weight.clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert fix_untrained_tokens(model, tok, dataset) == []
    assert torch.equal(before, model.get_input_embeddings().weight)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_text_dataset_is_tokenized(setup):
    tok, model, _, _, _ = setup
    cat = tok(" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    with torch.no_grad():
        model.get_input_embeddings().weight[cat[0]] = 0
    assert fix_untrained_tokens(model, tok, datasets.Dataset.from_dict({"text": ["a cat"]})) == cat
