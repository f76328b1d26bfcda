"""Split a reasoning model's output into its thinking and its answer."""
from __future__ import annotations

from typing import NamedTuple, Sequence

DEFAULT_THINK_END = "</think>"
DEFAULT_THINK_START = "<think>"


class ThinkingResponse(NamedTuple):
    thinking: str  # the reasoning text, without the think tags ("" when there was none)
    content: str  # the answer after the end-of-thinking token ("" while thinking is unfinished)
    finished: bool  # False when the output stopped inside the thinking part


def _single_token_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def parse_thinking_response(token_ids: Sequence[int], tokenizer, end_token: str = DEFAULT_THINK_END,
                            start_token: str = DEFAULT_THINK_START) -> ThinkingResponse:
    """Split generated ids (the new tokens only, 1-D) at the last end-of-thinking token.

    The end token's id is looked up in the tokenizer, never hard-coded. If the tokenizer has no such token, the
    decoded text is split instead. Output that opened a think block but never closed it is unfinished thinking:
    everything is thinking and the content is empty. Output with no think block at all is all content.
    """
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if token_ids and isinstance(token_ids[0], list):
        if len(token_ids) != 1:
            raise ValueError(f"parse_thinking_response takes one sequence, got a batch of {len(token_ids)}; "
                             "call it once per row")
        token_ids = token_ids[0]
    ids = list(token_ids)
    end_id = _single_token_id(tokenizer, end_token)
    start_id = _single_token_id(tokenizer, start_token)

    def text(part):
        return tokenizer.decode(part, skip_special_tokens=True).strip("\n").strip()

    if end_id is not None:
        if end_id in ids:
            cut = len(ids) - ids[::-1].index(end_id)
            thinking = [t for t in ids[:cut - 1] if t != start_id]
            return ThinkingResponse(text(thinking), text(ids[cut:]), True)
        if start_id is not None and start_id in ids:
            return ThinkingResponse(text([t for t in ids if t != start_id]), "", False)
        return ThinkingResponse("", text(ids), True)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if end_token in decoded:
        head, _, tail = decoded.rpartition(end_token)
        clean = tokenizer.decode(tokenizer.encode(tail, add_special_tokens=False), skip_special_tokens=True)
        return ThinkingResponse(head.replace(start_token, "").strip(), clean.strip(), True)
    if start_token in decoded:
        return ThinkingResponse(decoded.split(start_token, 1)[1].strip(), "", False)
    return ThinkingResponse("", text(ids), True)


def split_thinking_outputs(outputs, tokenizer, end_token: str = DEFAULT_THINK_END,
                           start_token: str = DEFAULT_THINK_START) -> list[tuple[str, str]]:
    """`(thinking, answer)` for every completion of `fast_generate`'s outputs (RequestOutput objects, vLLM's or
    fastlm's), in order: prompt by prompt, then each of its `n` completions."""
    pairs = []
    for out in outputs:
        for completion in out.outputs:
            parsed = parse_thinking_response(list(completion.token_ids), tokenizer, end_token, start_token)
            pairs.append((parsed.thinking, parsed.content))
    return pairs
