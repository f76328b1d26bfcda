"""`model.generate` on the engine, with transformers' signature and return types.

Served by the engine: greedy and sampling (temperature, top_k, top_p, min_p, repetition_penalty), EOS ids of the
generation config, `stop_strings` (with `tokenizer=`), `max_new_tokens` / `max_length`, `min_new_tokens` /
`min_length`, left-padded batches with `attention_mask`, `streamer=` (TextStreamer, TextIteratorStreamer), and
`return_dict_in_generate` (a `GenerateDecoderOnlyOutput` with `sequences`). Everything else (beam search,
assisted decoding, constraints, custom logits processors or stopping criteria, output scores, ...) goes to
transformers' own generate with a one-line notice naming the reason.
"""
from __future__ import annotations

import copy
import logging

import torch

from ..state import base_model_of, get_state
from .engine import UnsupportedModelError, get_engine
from .sampling import SamplingParams
from .scheduler import Request, Scheduler

logger = logging.getLogger(__name__)
_noticed: set[str] = set()

# generation-config fields the engine does not serve, with their "off" test
_OFF_FIELDS = {
    "num_beams": lambda v: v in (None, 1), "num_beam_groups": lambda v: v in (None, 1),
    "num_return_sequences": lambda v: v in (None, 1), "penalty_alpha": lambda v: v is None,
    "output_scores": lambda v: not v, "output_logits": lambda v: not v, "output_attentions": lambda v: not v,
    "output_hidden_states": lambda v: not v, "force_words_ids": lambda v: v is None,
    "constraints": lambda v: not v, "bad_words_ids": lambda v: v is None, "sequence_bias": lambda v: v is None,
    "no_repeat_ngram_size": lambda v: not v, "encoder_no_repeat_ngram_size": lambda v: not v,
    "guidance_scale": lambda v: v in (None, 1), "prompt_lookup_num_tokens": lambda v: v is None,
    "typical_p": lambda v: v in (None, 1.0), "epsilon_cutoff": lambda v: not v, "eta_cutoff": lambda v: not v,
    "exponential_decay_length_penalty": lambda v: v is None, "suppress_tokens": lambda v: not v,
    "begin_suppress_tokens": lambda v: not v, "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None, "renormalize_logits": lambda v: not v,
    "watermarking_config": lambda v: v is None, "max_time": lambda v: v is None, "dola_layers": lambda v: v is None,
    "assistant_early_exit": lambda v: v is None, "diversity_penalty": lambda v: not v,
    "top_h": lambda v: v is None, "low_memory": lambda v: not v,
}
_MODEL_KWARGS_OK = {"use_cache", "tokenizer"}


def _notice(reason: str) -> None:
    if reason not in _noticed:
        _noticed.add(reason)
        logger.warning("fastlm generate: %s; using transformers' generate", reason)


def _ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _plan(model, inputs, generation_config, kwargs, extra):
    """(input_ids, attention_mask, gc, tokenizer) when the engine serves the call, else a reason string."""
    for name, value in extra.items():
        if value not in (None, False) and not (name in ("logits_processor", "stopping_criteria") and len(value) == 0):
            return f"{name} is not served by the engine"
    kwargs = dict(kwargs)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    tokenizer = kwargs.pop("tokenizer", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        return "no input_ids tensor (inputs_embeds or other inputs)"
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    base = base_model_of(model)
    gc = copy.deepcopy(generation_config if generation_config is not None else base.generation_config)
    unused = gc.update(**kwargs)
    unknown = sorted(set(unused) - _MODEL_KWARGS_OK)
    if unknown:
        return f"model arguments {unknown} are not served by the engine"
    for name, is_off in _OFF_FIELDS.items():
        if hasattr(gc, name) and not is_off(getattr(gc, name)):
            return f"{name}={getattr(gc, name)!r} is not served by the engine"
    if any(p.device.type == "meta" for p in base.parameters()):
        return "the model has offloaded weights"
    pad = gc.pad_token_id
    if attention_mask is None:
        eos = _ids(gc.eos_token_id)
        if pad is not None and (input_ids == pad).any() and pad not in eos:
            attention_mask = input_ids.ne(pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    # left padding only: once a row's mask is 1 it stays 1
    m = attention_mask.long()
    if (m.cummax(dim=1).values != m).any():
        return "the batch is right-padded (use tokenizer.padding_side='left')"
    if (m.sum(1) == 0).any():
        return "a row of the batch is all padding"
    return input_ids, m, gc, tokenizer


def engine_generate(model, original, inputs=None, generation_config=None, logits_processor=None,
                    stopping_criteria=None, prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None,
                    streamer=None, negative_prompt_ids=None, negative_prompt_attention_mask=None, *,
                    engine_for=get_engine, **kwargs):
    """transformers' `generate` contract, served by the engine where it can be (see the module docstring).
    `engine_for(model, slots=, max_len=)` gives the engine to use (default: the one cached on the model; the
    training-time hook passes its own, kept current with the weights being trained)."""
    extra = dict(logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                 prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, synced_gpus=synced_gpus,
                 assistant_model=assistant_model, negative_prompt_ids=negative_prompt_ids,
                 negative_prompt_attention_mask=negative_prompt_attention_mask)
    plan = _plan(model, inputs, generation_config, kwargs, extra)
    if isinstance(plan, str):
        _notice(plan)
        return original(inputs, generation_config=generation_config, **{k: v for k, v in extra.items()
                                                                         if v is not None},
                        streamer=streamer, **kwargs)
    input_ids, mask, gc, tokenizer = plan
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("`streamer` supports only batch size 1 (as in transformers' generate)")
    in_len = input_ids.shape[1]
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - in_len
    if max_new < 1:
        _notice(f"max_length={gc.max_length} leaves no room for new tokens")
        return original(inputs, generation_config=generation_config, streamer=streamer, **kwargs)
    min_new = gc.min_new_tokens or max(0, (gc.min_length or 0) - in_len)
    tokenizer = tokenizer or default_tokenizer(model)
    if gc.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: call generate(..., tokenizer=tokenizer) "
                         "(as transformers' generate does)")
    sample = bool(gc.do_sample)
    params = SamplingParams(
        temperature=float(gc.temperature if gc.temperature is not None else 1.0) if sample else 0.0,
        top_k=int(gc.top_k or 0) if sample else -1, top_p=float(gc.top_p if gc.top_p is not None else 1.0),
        min_p=float(gc.min_p or 0.0), max_tokens=int(max_new), min_tokens=int(min_new),
        repetition_penalty=float(gc.repetition_penalty or 1.0),
        stop=[gc.stop_strings] if isinstance(gc.stop_strings, str) else gc.stop_strings,
        skip_special_tokens=False)
    eos = _ids(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    rows = [input_ids[i][mask[i].bool()].tolist() for i in range(input_ids.shape[0])]
    try:
        engine = engine_for(model, slots=len(rows), max_len=max(len(r) for r in rows) + max_new)
    except UnsupportedModelError as exc:
        _notice(str(exc))
        return original(inputs, generation_config=generation_config, streamer=streamer, **kwargs)
    sched = Scheduler(engine, tokenizer)
    on_tokens = None
    if streamer is not None:
        streamer.put(input_ids.cpu())
        on_tokens = lambda ids: streamer.put(torch.as_tensor(ids))  # noqa: E731
    for i, r in enumerate(rows):
        sched.add(Request(r, params, eos_ids=eos, on_tokens=on_tokens, tag=i))
    results = sorted(sched.run_all(), key=lambda res: res.request.tag)
    if streamer is not None:
        streamer.end()
    width = max(len(res.token_ids) for res in results)
    new = torch.full((len(rows), width), pad, dtype=input_ids.dtype)
    for i, res in enumerate(results):
        new[i, :len(res.token_ids)] = torch.as_tensor(res.token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def default_tokenizer(model):
    state = get_state(model)
    return state.tokenizer if state is not None else None
