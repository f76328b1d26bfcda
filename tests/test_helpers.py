"""parse_thinking_response, memory helpers, is_bf16_supported."""
import torch

from fastlm import cleanup_memory, gpu_memory_used, is_bf16_supported, parse_thinking_response
from fixtures.tiny import build_tokenizer


def _think_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


def test_thinking_split_uses_the_tokenizers_end_token():
    tok = _think_tokenizer()
    end_id = tok.convert_tokens_to_ids("</think>")
    assert end_id == len(tok) - 1  # an id no hard-coded constant would know
    ids = tok.encode("<think>the cat is red</think>the answer is paris", add_special_tokens=False)
    thinking, content, finished = parse_thinking_response(ids, tok)
    assert (thinking, content, finished) == ("the cat is red", "the answer is paris", True)
    thinking, content, finished = parse_thinking_response(torch.tensor(ids), tok)
    assert content == "the answer is paris"


def test_unfinished_thinking_and_no_thinking():
    tok = _think_tokenizer()
    ids = tok.encode("<think>still thinking about the", add_special_tokens=False)
    assert parse_thinking_response(ids, tok) == ("still thinking about the", "", False)
    ids = tok.encode("just an answer", add_special_tokens=False)
    assert parse_thinking_response(ids, tok) == ("", "just an answer", True)


def test_thinking_without_special_tokens_falls_back_to_text():
    tok = build_tokenizer()  # no <think> tokens: split on the decoded text
    ids = tok.encode("<think>red cat</think>blue dog", add_special_tokens=False)
    assert parse_thinking_response(ids, tok)[:2] == ("red cat", "blue dog")


def test_memory_helpers_work_and_say_what_they_measured():
    usage = gpu_memory_used()
    assert usage.used_gb > 0 and usage.peak_gb >= usage.used_gb * 0.5
    if not torch.cuda.is_available():
        assert usage.device == "cpu" and "no GPU" in str(usage)
        assert is_bf16_supported() is False
    assert cleanup_memory().device == usage.device
