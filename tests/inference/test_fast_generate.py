"""fast_generate: vLLM-shaped outputs, continuous batching equal to one-by-one, SamplingParams validation."""
import pytest

from fastlm.errors import ConfigError
from fastlm.inference import SamplingParams
from fastlm.inference.fast_generate import LoRARequest
from fastlm.inference.thinking import split_thinking_outputs

PROMPTS = ["the cat is", "what is the capital of france? the capital", "red", "one two three", "blue river"]


def test_list_of_prompts_equals_one_by_one_with_fewer_slots_than_prompts(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("qwen3"))
    sp = SamplingParams(temperature=0, max_tokens=14)
    together = model.fast_generate(PROMPTS, sp, max_num_seqs=2)  # 5 prompts through 2 slots: slots are reused
    assert [o.prompt for o in together] == PROMPTS
    for prompt, out in zip(PROMPTS, together):
        alone = model.fast_generate(prompt, sp)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids
        assert out.outputs[0].text == alone.text
        assert out.outputs[0].finish_reason == "length" and len(alone.token_ids) == 14
    ids = tok(PROMPTS[1])["input_ids"]
    hf = model.generate(**tok([PROMPTS[1]], return_tensors="pt"), max_new_tokens=14, do_sample=False)
    assert together[1].outputs[0].token_ids == hf[0, len(ids):].tolist()
    assert model.fast_generate([ids], sp)[0].outputs[0].token_ids == hf[0, len(ids):].tolist()  # token-id prompt


def test_stop_strings_eos_and_seeds(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"))
    free = model.fast_generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    stop = free.text[len(free.text) // 2:][:3]
    cut = model.fast_generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[:free.text.find(stop)]
    eos_id = free.token_ids[5]
    ended = model.fast_generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20,
                                                           stop_token_ids=[eos_id]))[0].outputs[0]
    assert ended.token_ids == free.token_ids[:free.token_ids.index(eos_id) + 1] and ended.finish_reason == "stop"
    sp = SamplingParams(temperature=1.3, top_p=0.9, top_k=50, min_p=0.01, seed=7, max_tokens=16,
                        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
    a = model.fast_generate(PROMPTS[:1], sp)[0].outputs[0].token_ids
    b = model.fast_generate(PROMPTS, sp)[0].outputs[0].token_ids  # other requests in the batch change nothing
    assert a == b and a != free.token_ids[:16]
    n3 = model.fast_generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=8,
                                                        logprobs=2))[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2] and len({tuple(c.token_ids) for c in n3.outputs}) > 1
    lp = n3.outputs[0].logprobs
    assert len(lp) == 8 and all(len(d) >= 2 and max(d.values()) <= 0 for d in lp)


@pytest.mark.parametrize("bad, needle", [
    (dict(temperature=-0.5), "temperature=-0.5"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_tokens=0), "max_tokens=0"), (dict(top_k=-3), "top_k=-3"), (dict(n=0), "n=0"),
])
def test_sampling_params_reject_invalid_values(bad, needle):
    with pytest.raises(ConfigError) as err:
        SamplingParams(**bad)
    assert needle in str(err.value) and "Fix:" in str(err.value)


def test_sampling_params_unknown_field_names_the_known_ones():
    with pytest.raises(ConfigError, match="best_of_n"):
        SamplingParams.from_kwargs(best_of_n=2)


def test_lora_request_selects_a_loaded_adapter(tiny_model_factory, loaded, tmp_path):
    model, tok = loaded(tiny_model_factory("llama"), lora=True)
    sp = SamplingParams(temperature=0, max_tokens=10)
    with_adapter = model.fast_generate(PROMPTS[0], sp)[0].outputs[0].token_ids
    model.save_pretrained(tmp_path / "ad")
    via_request = model.fast_generate(PROMPTS[0], sp, lora_request=LoRARequest("other", 2, str(tmp_path / "ad")))
    assert via_request[0].outputs[0].token_ids == with_adapter
    with model.disable_adapter():
        plain = model.fast_generate(PROMPTS[0], sp)[0].outputs[0].token_ids
    assert plain != with_adapter
    with pytest.raises(ConfigError, match="missing"):
        model.fast_generate(PROMPTS[0], sp, lora_request=LoRARequest("missing", 3))


def test_thinking_split_of_outputs(tiny_model_factory, loaded):
    model, tok = loaded(tiny_model_factory("llama"))
    outs = model.fast_generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6), use_tqdm=True)
    pairs = split_thinking_outputs(outs, tok)
    assert [a for _, a in pairs] == [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip()
                                     for o in outs]
