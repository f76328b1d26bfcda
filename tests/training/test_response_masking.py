"""train_on_responses_only on real TRL SFTTrainers over a tiny llama: which tokens are trained, and the errors."""
from __future__ import annotations

import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from fixtures.tiny import build_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm.training.response_masking import (  # noqa: E402
    IGNORE_INDEX, ResponseMasker, ResponseMaskingError, ResponseOnlyCollator, resolve_turn_markers,
    train_on_responses_only)

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "system", "content": "Answer in a small model way."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."},
         {"role": "user", "content": "And a red bird?"},
         {"role": "assistant", "content": "A blue tree in the city."}]
PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
                  "{% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}")


def make_trainer(model_dir, tmp_path, conversations, n=8, max_steps=2, **config):
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
                         learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, **config)
    dataset = datasets.Dataset.from_list([{"messages": conversations}] * n)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora)


def trained_segments(tok, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive labels that are not -100 (checking they equal the input ids there)."""
    segments, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def test_markers_detected_from_chat_template():
    markers = resolve_turn_markers(build_tokenizer())
    assert markers.instruction == "<|im_start|>user\n"
    assert markers.response == "<|im_start|>assistant\n"
    assert markers.end_of_turn == "<|im_end|>\n"
    assert markers.source == "chat template"


def test_single_turn_user_masked_reply_trained(tiny_llama_dir, tmp_path):
    trainer = train_on_responses_only(make_trainer(tiny_llama_dir, tmp_path, SINGLE))
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    prompt_len = len(tok(tok.apply_chat_template(SINGLE[:1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    assert row["input_ids"][:prompt_len] == tok(tok.apply_chat_template(SINGLE, tokenize=False),
                                                add_special_tokens=False)["input_ids"][:prompt_len]
    assert all(label == IGNORE_INDEX for label in row["labels"][:prompt_len])  # user turn + assistant header
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert trained_segments(tok, row["input_ids"], row["labels"]) == ["The capital of France is Paris.<|im_end|>\n"]

    # the collated batch (padded) carries the same labels, padding masked
    assert isinstance(trainer.data_collator, ResponseOnlyCollator)
    short = dict(row, input_ids=row["input_ids"][:-1], labels=row["labels"][:-1])
    batch = trainer.data_collator([{"input_ids": row["input_ids"], "labels": row["labels"]},
                                   {"input_ids": short["input_ids"], "labels": short["labels"]}])
    assert batch["labels"][0].tolist() == row["labels"]
    assert batch["labels"][1, -1].item() == IGNORE_INDEX

    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert trainer.state.global_step == 2


def test_multi_turn_every_reply_trained_system_and_users_masked(tiny_llama_dir, tmp_path):
    trainer = train_on_responses_only(make_trainer(tiny_llama_dir, tmp_path, MULTI, max_steps=1))
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    assert trained_segments(tok, row["input_ids"], row["labels"]) == [
        "The capital of France is Paris.<|im_end|>\n", "A blue tree in the city.<|im_end|>\n"]
    text_masked = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX])
    for message in MULTI:
        if message["role"] != "assistant":
            assert message["content"] in text_masked
    assert math.isfinite(trainer.train().training_loss)


def test_wrong_markers_raise_with_markers_sample_and_fix(tiny_llama_dir, tmp_path):
    trainer = make_trainer(tiny_llama_dir, tmp_path, SINGLE)
    with pytest.raises(ResponseMaskingError) as info:
        train_on_responses_only(trainer, instruction_part="### Human:", response_part="### Assistant:")
    message = str(info.value)
    assert "'### Human:'" in message and "'### Assistant:'" in message
    tok = trainer.processing_class
    assert str(list(tok("### Assistant:", add_special_tokens=False)["input_ids"])) in message  # token ids shown
    assert "What is the capital of France?" in message  # decoded sample
    assert "instruction_part=" in message and "response_part=" in message  # the fix
    assert "found in sample: NO" in message


def test_missing_template_and_markers_names_the_fix(tiny_llama_dir, tmp_path):
    tok = build_tokenizer(chat_template=False)
    with pytest.raises(ResponseMaskingError, match="instruction_part=.*response_part="):
        resolve_turn_markers(tok)
    with pytest.raises(Exception, match="instruction_part"):
        resolve_turn_markers(tok, instruction_part="", response_part="x")


def test_training_stops_before_first_step_when_first_batches_have_no_reply(tiny_llama_dir, tmp_path):
    trainer = train_on_responses_only(make_trainer(tiny_llama_dir, tmp_path, SINGLE))
    tok = trainer.processing_class
    plain = tok("What is the capital of France? The capital of France is Paris.", add_special_tokens=False)
    trainer.train_dataset = datasets.Dataset.from_list([{"input_ids": plain["input_ids"]}] * 4)
    with pytest.raises(ResponseMaskingError, match="every label in a batch is -100"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_markers_found_when_they_tokenize_differently_in_context():
    tok = build_tokenizer()
    tok.chat_template = PLAIN_TEMPLATE
    markers = resolve_turn_markers(tok)
    assert (markers.instruction, markers.response) == ("User: ", "Assistant: ")
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "the capital of France is Paris."},
                    {"role": "user", "content": "Red?"}, {"role": "assistant", "content": "cat and dog."}]
    ids = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    alone = tok("Assistant: ", add_special_tokens=False)["input_ids"]
    assert not any(ids[i:i + len(alone)] == alone for i in range(len(ids)))  # the space merged into the next word
    labels = ResponseMasker(markers).mask_labels(ids)
    segments = trained_segments(tok, ids, labels)
    assert [s.strip() for s in segments] == ["the capital of France is Paris.", "cat and dog."]


def test_padding_free_batches_are_masked_per_sequence():
    tok = build_tokenizer()
    masker = ResponseMasker(resolve_turn_markers(tok))
    rows = [tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
            for conv in (SINGLE, MULTI[1:])]
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    wrapped = ResponseOnlyCollator(collator, masker, tok)
    batch = wrapped([{"input_ids": r} for r in rows])
    expected = [label for r in rows for label in masker.mask_labels(r)]
    assert batch["labels"].shape == (1, sum(map(len, rows)))
    assert batch["labels"][0].tolist() == expected
    assert wrapped.padding_free is True  # attributes pass through to the wrapped collator
    assert isinstance(batch["labels"], torch.Tensor)
