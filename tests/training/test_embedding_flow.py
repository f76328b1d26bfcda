"""The seed's "Training Embeddings" flow: QLoRA with embed_tokens and lm_head in target_modules, a few SFTTrainer
steps with Unsloth's `fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported()` idiom, then for_inference and
generate. TRL casts the trainable copies of a 4-bit model to bf16 while the rest computes in fp32 (on CPU); the
generation after training must still work, and must use the trained copies."""
from __future__ import annotations

import pytest
import torch

from fastlm import FastLanguageModel, is_bfloat16_supported


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
def test_train_embeddings_then_generate(load_in_4bit, tiny_llama_dir, tmp_path):
    pytest.importorskip("trl")
    if load_in_4bit:
        pytest.importorskip("bitsandbytes")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_llama_dir), max_seq_length=64,
                                                         load_in_4bit=load_in_4bit, load_in_16bit=not load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"],
        use_gradient_checkpointing="unsloth", random_state=3407)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    data = Dataset.from_dict({"text": ["the cat sat on the mat"] * 4})
    trainer = SFTTrainer(model=model, train_dataset=data, processing_class=tokenizer, args=SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2, report_to="none",
        fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(), max_length=32, save_strategy="no",
        use_cpu=not torch.cuda.is_available()))
    trainer.train()

    FastLanguageModel.for_inference(model)
    inputs = tokenizer("the cat", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    # the trained copy is what generation uses: it changed, and it is in the model's dtype again
    embed_after = model.get_input_embeddings().weight
    assert not torch.equal(embed_after.float(), embed_before.float())
    base_dtype = model.get_base_model().model.norm.weight.dtype
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert len(copies) == 2 and all(p.dtype == base_dtype for p in copies)
