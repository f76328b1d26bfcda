"""`model.fast_generate(prompts, sampling_params=None, lora_request=None)` with vLLM's call and output shapes.

Prompts are strings, token-id lists, or vLLM-style dicts ({"prompt": ...} / {"prompt_token_ids": ...}); one or a
list. The built-in engine batches continuously: up to `max_num_seqs` sequences decode together and a finished
sequence's slot takes the next prompt. When the model was loaded with `fast_inference=True` and vLLM serves it,
the same call goes to vLLM (see vllm_backend).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, Problem, UnsupportedFeatureError
from ..state import base_model_of, get_state
from .engine import get_engine
from .sampling import SamplingParams
from .scheduler import Request, Scheduler

DEFAULT_MAX_NUM_SEQS = 64


@dataclass
class LoRARequest:
    """vLLM's LoRARequest fields: which adapter serves a request (by name, loaded from lora_path if needed)."""

    lora_name: str
    lora_int_id: int = 1
    lora_path: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended the output


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every EOS id the model knows: the tokenizer's and the generation config's (and the model config's)."""
    base = base_model_of(model)
    ids: list[int] = []
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(base.generation_config, "eos_token_id", None),
                getattr(base.config, "eos_token_id", None)):
        for v in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def _normalize_prompts(prompts, tokenizer) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("fast_generate", [Problem("prompts", p[:40], "token ids when the model has no "
                                  "tokenizer", "load the model with FastLanguageModel.from_pretrained")])
            out.append((p, tokenizer(p, add_special_tokens=True)["input_ids"]))
        elif isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p):
            out.append((tokenizer.decode(p) if tokenizer is not None else None, list(p)))
        else:
            raise ConfigError("fast_generate", [Problem("prompts", repr(p)[:60], "a string, a list of token ids, "
                              "a {'prompt': ...} dict, or a list of those", "pass non-empty prompts")])
    return out


def _use_adapter(model, lora_request):
    """Make lora_request's adapter the active one; returns a function that restores the previous state."""
    if lora_request is None:
        return lambda: None
    name = getattr(lora_request, "lora_name", None)
    path = getattr(lora_request, "lora_path", None) or getattr(lora_request, "path", None)
    if not hasattr(model, "peft_config"):
        raise UnsupportedFeatureError(
            f"lora_request={name!r} needs a PEFT model: call get_peft_model or load the adapter directory with "
            "FastLanguageModel.from_pretrained first (the built-in engine serves the model's own adapters)")
    if name not in model.peft_config:
        if not path:
            raise ConfigError("fast_generate", [Problem("lora_request.lora_name", name,
                              f"one of the loaded adapters {sorted(model.peft_config)} or a request with lora_path",
                              "pass LoRARequest(name, 1, adapter_dir)")])
        model.load_adapter(path, adapter_name=name)
    previous = list(model.active_adapters) if hasattr(model, "active_adapters") else [model.active_adapter]
    model.set_adapter(name)
    return lambda: model.set_adapter(previous[0] if len(previous) == 1 else previous)


def fast_generate(model, prompts, sampling_params=None, lora_request=None, use_tqdm=False,
                  max_num_seqs: int | None = None):
    """Generate for one or many prompts; returns a list of `RequestOutput` (vLLM's shape), in prompt order.

    sampling_params: a SamplingParams, a list of one per prompt, or None (SamplingParams()).
    use_tqdm: show a progress bar over finished outputs. max_num_seqs: slots decoded together.
    """
    backend = getattr(base_model_of(model), "_fastlm_vllm", None)
    if backend is not None:
        return backend.generate(prompts, sampling_params, lora_request)
    state = get_state(model)
    tokenizer = state.tokenizer if state is not None else None
    items = _normalize_prompts(prompts, tokenizer)
    if sampling_params is None:
        sampling_params = SamplingParams()
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
    if len(params) != len(items) or not all(isinstance(p, SamplingParams) for p in params):
        raise ConfigError("fast_generate", [Problem("sampling_params", type(sampling_params).__name__,
                          "a SamplingParams or a list of one per prompt", "use fastlm.SamplingParams(...)")])
    slots = max_num_seqs or DEFAULT_MAX_NUM_SEQS
    if not isinstance(slots, int) or slots < 1:
        raise ConfigError("fast_generate", [Problem("max_num_seqs", max_num_seqs, "an int >= 1", "use 64")])
    eos = eos_ids_of(model, tokenizer)
    cap = int(getattr(base_model_of(model), "max_seq_length", 0) or 2048)
    # max_tokens=None: up to max_seq_length in all (prompt + output)
    need = max(len(ids) + (p.max_tokens or max(1, cap - len(ids))) for (_, ids), p in zip(items, params))
    restore = _use_adapter(model, lora_request)
    try:
        requests = []
        for i, ((_, ids), p) in enumerate(zip(items, params)):
            for j in range(p.n):
                pj = p if p.n == 1 or p.seed is None else _with_seed(p, p.seed + j)
                requests.append(Request(ids, pj, eos_ids=eos, tag=(i, j)))
        engine = get_engine(model, slots=min(slots, len(requests)), max_len=need)
        sched = Scheduler(engine, tokenizer)
        for r in requests:
            sched.add(r)
        results = _run(sched, len(requests), use_tqdm)
    finally:
        restore()
    outputs = [RequestOutput(str(i), text, ids) for i, (text, ids) in enumerate(items)]
    for res in sorted(results, key=lambda r: r.request.tag):
        i, j = res.request.tag
        outputs[i].outputs.append(_completion(j, res, tokenizer))
    return outputs


def _run(sched, total: int, use_tqdm: bool):
    if not use_tqdm:
        return sched.run_all()
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="fast_generate", unit="seq") as bar:
        while sched.busy():
            bar.update(len(sched.step()))
    out, sched.finished = sched.finished, []
    return out


def _with_seed(p: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(p, seed=seed)


def _completion(index, res, tokenizer) -> CompletionOutput:
    p = res.request.params
    text = tokenizer.decode(res.token_ids, skip_special_tokens=p.skip_special_tokens) if tokenizer else ""
    stop_reason = None
    if res.stop_str is not None:
        stop_reason = res.stop_str
        if not p.include_stop_str_in_output and res.stop_str in text:
            text = text[:text.find(res.stop_str)]
    elif res.finish_reason == "stop" and res.token_ids:
        stop_reason = res.token_ids[-1]
    cum = None
    if res.logprobs is not None:
        cum = float(sum(lp[t] for lp, t in zip(res.logprobs, res.token_ids)))
    return CompletionOutput(index, text, res.token_ids, cum, res.logprobs, res.finish_reason, stop_reason)
