"""GGUF with SentencePiece-style tokenizers (Llama-2 / Mistral and Gemma style, trained offline): llama.cpp tokenizes
ASCII, accents, emoji (byte fallback), digits and leading / repeated spaces to the HF ids, and a tiny llama and a
tiny gemma continue greedily as the HF model does; Unigram tokenizers are refused."""
import pytest

from fixtures.spm import build_bytefallback_bpe, build_spm_tokenizer
from fixtures.tiny import _corpus, save_tiny_model

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

TEXTS = ["The capital of France is Paris.", "Café déjà vu, naïve façade: über straße",
         "emoji 🙂🚀 and 漢字", "digits 2024 and 31415926", " one leading space", "   three leading spaces",
         "two  inner   spaces\nnew line", "Hello World", "a", "!?"]


@pytest.mark.parametrize("style,model_type", [("llama", "llama"), ("gemma", "gemma")])
def test_spm_tokenizer_in_llama_cpp(style, model_type, tmp_path, lora_model_factory):
    import gguf

    from fastlm.export.gguf.verify import _cpp_greedy, load_llama
    from fastlm.export.verify import greedy_tokens

    tok = build_spm_tokenizer(tmp_path / "tok", style)
    extra = {"tie_word_embeddings": True} if model_type == "gemma" else {}
    src = save_tiny_model(model_type, tmp_path / "src", tokenizer=tok, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **extra)
    model, tok = lora_model_factory(src)
    report = model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32")
    check = report["checks"][0]
    assert check["passed"], check["problems"]
    print(f"{style} spm {model_type}: max |dlogit| {check['metrics']['max_abs_logit_diff']:.2e}")
    assert check["metrics"]["max_abs_logit_diff"] < 1e-3
    path = tmp_path / "g" / "model.F32.gguf"

    fields = gguf.GGUFReader(str(path)).fields
    text = lambda key: bytes(fields[key].parts[fields[key].data[0]]).decode()  # noqa: E731
    assert text("tokenizer.ggml.model") == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) == (style == "llama")

    llm = load_llama(path)
    try:
        for t in TEXTS:
            if style == "llama" and t.startswith(" "):
                continue  # known difference, see test_leading_space_with_prepended_space
            hf = tok(t)["input_ids"]
            cpp = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
            assert cpp == hf, (t, tok.convert_ids_to_tokens(hf), tok.convert_ids_to_tokens(cpp))
            assert llm.detokenize(cpp[1:]).decode("utf-8").strip() == t.strip()
        byte_ids = [i for i in tok(TEXTS[2])["input_ids"] if tok.convert_ids_to_tokens(i).startswith("<0x")]
        assert byte_ids  # the emoji really went through byte fallback
        prompt = tok(TEXTS[0])["input_ids"]
        hf_cont, cpp_cont = greedy_tokens(model, prompt, 16), _cpp_greedy(llm, prompt, 16)
    finally:
        llm.close()
    assert cpp_cont == hf_cont


def test_tokenizers_trained_byte_fallback_bpe(tmp_path, lora_model_factory):
    """Not converted from SentencePiece: merge-order scores make llama.cpp's score-first merging give the HF ids on
    200 generated sentences and the texts above."""
    from fastlm.export.gguf.verify import load_llama

    model, tok = lora_model_factory(save_tiny_model("llama", tmp_path / "src", tokenizer=build_bytefallback_bpe()))
    model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)
    llm = load_llama(tmp_path / "g" / "model.F32.gguf")
    try:
        texts = _corpus(200, seed=5) + [t for t in TEXTS if not t.startswith(" ")]
        differ = [t for t in texts
                  if llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) != tok(t)["input_ids"]]
    finally:
        llm.close()
    assert differ == []


def test_leading_space_with_prepended_space(tmp_path, lora_model_factory):
    """transformers' Metaspace (prepend_scheme="first") adds no ▁ before a text that starts with a space; llama.cpp
    (like SentencePiece itself) always adds one: such texts get one extra ▁ in llama.cpp. Documented in
    docs/export.md; the check's texts do not start with a space."""
    from fastlm.export.gguf.verify import load_llama

    tok = build_spm_tokenizer(tmp_path / "tok", "llama")
    model, tok = lora_model_factory(save_tiny_model("llama", tmp_path / "src", tokenizer=tok))
    model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)
    llm = load_llama(tmp_path / "g" / "model.F32.gguf")
    try:
        cpp = llm.tokenize(b" one leading space", add_bos=True, special=True)
    finally:
        llm.close()
    assert tok.convert_ids_to_tokens(cpp[:3]) == ["<s>", "\u2581", "\u2581one"]
    assert cpp[2:] == tok(" one leading space")["input_ids"][1:]


def test_unigram_tokenizer_is_refused(tmp_path, lora_model_factory, tiny_model_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastlm.errors import UnsupportedFeatureError

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"\u2581{w}", -1.0 - i) for i, w in enumerate("abcdefgh")]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    src = save_tiny_model("llama", tmp_path / "src", tokenizer=tok)
    model, tok = lora_model_factory(src)
    with pytest.raises(UnsupportedFeatureError, match="Unigram"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="f32", verify=False)
    assert not (tmp_path / "g").exists()
