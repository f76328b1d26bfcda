"""The engine's greedy output equals transformers' generate, token for token, for every registered family."""
import re

import pytest
import torch

from fixtures.tiny import FAMILY_MODEL_TYPES

from fastlm.inference.attach import disable_fast_generate, enable_fast_generate
from fastlm.inference.train_generate import remove_training_generate, training_generate_installed

PROMPTS = ["the cat is", "what is the capital of france? the capital", "red"]


def _hf_and_engine(model, **kw):
    disable_fast_generate(model)
    ref = model.generate(**kw)
    enable_fast_generate(model)
    return ref, model.generate(**kw)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_greedy_batch_equals_transformers(tiny_model_factory, loaded, model_type, lora):
    model, tok = loaded(tiny_model_factory(model_type), lora=lora)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][2, 0] == 0  # left padding is exercised
    ref, ours = _hf_and_engine(model, **batch, max_new_tokens=24, do_sample=False)
    assert ours.shape == ref.shape
    assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_the_sequence(tiny_model_factory, loaded, model_type):
    model, tok = loaded(tiny_model_factory(model_type, sliding_window=6))
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    ref, ours = _hf_and_engine(model, **batch, max_new_tokens=20, do_sample=False)
    assert ours.tolist() == ref.tolist()


def test_lora_changes_the_output_and_matches_peft(tiny_model_factory, loaded):
    plain, tok = loaded(tiny_model_factory("llama"))
    adapted, _ = loaded(tiny_model_factory("llama"), lora=True)
    batch = tok(PROMPTS[:1], return_tensors="pt")
    a = plain.generate(**batch, max_new_tokens=16, do_sample=False)
    b = adapted.generate(**batch, max_new_tokens=16, do_sample=False)
    assert a.tolist() != b.tolist()  # the adapter is really applied (not merged away or skipped)


def test_eos_and_stop_strings_end_rows_like_transformers(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("qwen2"))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    free = model.generate(**batch, max_new_tokens=24, do_sample=False)
    # make a token the model really produces in row 0 the EOS, and a piece of row 1's text a stop string
    eos = int(free[0, batch["input_ids"].shape[1] + 3])
    text1 = tok.decode(free[1, batch["input_ids"].shape[1]:])
    stop = re.findall(r"[a-z]{3,}", text1[len(text1) // 3:])[0]  # whole bytes: a string a tokenizer can match
    kw = dict(**batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref, ours = _hf_and_engine(model, **kw)
    assert ours.tolist() == ref.tolist()
    assert (ours[0] == 0).any()  # row 0 really stopped early and was padded
    ref, ours = _hf_and_engine(model, **batch, max_new_tokens=24, do_sample=False, stop_strings=[stop],
                               tokenizer=tok, pad_token_id=0)
    assert ours.tolist() == ref.tolist()
    assert ours[1, -1] == 0 and ref[1, -1] == 0  # row 1 really stopped at the stop string


def test_repetition_penalty_and_min_new_tokens_equal_transformers(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    free = model.generate(**batch, max_new_tokens=10, do_sample=False)
    eos = int(free[0, batch["input_ids"].shape[1] + 1])
    ref, ours = _hf_and_engine(model, **batch, max_new_tokens=16, min_new_tokens=8, do_sample=False,
                               repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0)
    assert ours.tolist() == ref.tolist()


def test_top_k_one_sampling_equals_greedy_and_seeds_reproduce(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
    topk1 = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7)
    assert topk1.tolist() == greedy.tolist()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**batch, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0).tolist())
    assert runs[0] == runs[1]
    assert runs[0] != greedy.tolist()


def test_streamers_yield_the_generated_text(tiny_model_factory, loaded, capsys):
    from threading import Thread

    from transformers import TextIteratorStreamer, TextStreamer

    model, tok = loaded(tiny_model_factory("llama"))
    inputs = tok(["the cat is"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    capsys.readouterr()
    model.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out.strip() == text.strip()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t = Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=12, do_sample=False, streamer=streamer))
    t.start()
    pieces = list(streamer)
    t.join(timeout=60)
    assert "".join(pieces).strip() == text.strip()


def test_return_dict_and_fallback_notice(tiny_model_factory, loaded, caplog):
    model, tok = loaded(tiny_model_factory("llama"))
    inputs = tok(["the cat is"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 5)
    with caplog.at_level("WARNING"):
        beams = model.generate(**inputs, max_new_tokens=5, num_beams=2, do_sample=False)
    assert "num_beams=2 is not served by the engine; using transformers' generate" in caplog.text
    assert beams.shape[1] == inputs["input_ids"].shape[1] + 5


def test_disable_gives_back_the_plain_method(tiny_model_factory, loaded):
    model, _ = loaded(tiny_model_factory("llama"), lora=True)
    base = model.get_base_model()
    assert "generate" in model.__dict__ and "generate" in base.__dict__
    disable_fast_generate(model)
    # what was there before: the training-time generate fastlm models carry (train_generate.py), then the plain one
    assert training_generate_installed(model) and training_generate_installed(base)
    remove_training_generate(model)
    assert "generate" not in model.__dict__ and "generate" not in base.__dict__
    assert model.generate.__func__ is type(model).generate
