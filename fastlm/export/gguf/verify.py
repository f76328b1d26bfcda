"""Check a GGUF file in llama.cpp against the model in memory: tokenization, next-token distributions (mean KL,
top-1 agreement, max logit difference) on fixed texts, and a greedy continuation."""
from __future__ import annotations

import numpy as np
import torch

from ..verify import check, combine, compare_logits, greedy_tokens, logits_of, verify_inputs, VERIFY_TEXTS
from .quantize import llama_cpp_module

GREEDY_TOKENS = 8


def tier_for_method(method: str, source_quantized: bool) -> str:
    if source_quantized:
        return "quantized" if method in ("f32", "f16", "bf16", "q8_0") else "report"
    return {"f32": "exact", "f16": "half", "bf16": "half", "q8_0": "quantized"}.get(method, "report")


def load_llama(path, n_ctx: int = 128):
    """llama.cpp with an f32 KV cache (its default f16 cache alone moves logits by ~1e-3)."""
    llama_cpp = llama_cpp_module("checking a GGUF export in llama.cpp (pass verify=False to skip)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                           n_threads_batch=2, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)


def _cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def verify_gguf(model, tokenizer, path, method: str, source_quantized: bool) -> dict:
    """Report for one GGUF file; `passed` is False when tokenization differs or the tier's bounds are exceeded."""
    llm = load_llama(path)
    try:
        inputs = verify_inputs(tokenizer)
        token_problems = []
        texts = list(VERIFY_TEXTS)
        for text, ids in zip(texts, inputs):
            cpp = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)[: len(ids)]
            if cpp != ids:
                first = next((i for i, (a, b) in enumerate(zip(cpp, ids)) if a != b), min(len(cpp), len(ids)))
                token_problems.append(f"llama.cpp tokenizes {text[:30]!r} differently from the HF tokenizer "
                                      f"(first difference at token {first})")
        rows = [compare_logits(logits_of(model, ids), _cpp_logits(llm, ids)) for ids in inputs]
        prompt = inputs[-1][:32]
        hf_cont, cpp_cont = greedy_tokens(model, prompt, GREEDY_TOKENS), _cpp_greedy(llm, prompt, GREEDY_TOKENS)
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm
    metrics = combine(rows)
    agree = 0
    for a, b in zip(hf_cont, cpp_cont):
        if a != b:
            break
        agree += 1
    metrics["greedy_agreement_tokens"] = agree
    metrics["greedy_tokens"] = GREEDY_TOKENS
    result = check(f"gguf {method}", metrics, tier_for_method(method, source_quantized), file=str(path.name),
                   hf_greedy=tokenizer.decode(hf_cont), llama_cpp_greedy=tokenizer.decode(cpp_cont))
    if token_problems:
        result["problems"] += token_problems
        result["passed"] = False
    return result
