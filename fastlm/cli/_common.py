"""What `fastlm chat` and `fastlm generate` share: model arguments, sampling flags, loading and one generation."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ..loading.embedded import EMBEDDED_MODEL_NAME

PRECISIONS = ("auto", "4bit", "8bit", "16bit")


def add_model_args(p) -> None:
    p.add_argument("model", nargs="?", default=EMBEDDED_MODEL_NAME, metavar="MODEL_OR_DIR",
                   help="a model name, a model directory or a saved LoRA adapter directory (such as the output.dir "
                        f"of fastlm train); default: the embedded {EMBEDDED_MODEL_NAME}")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="weights: auto = 4bit on a GPU, 16bit on CPU")
    p.add_argument("--max-seq-length", type=int, default=2048, help="context length (default 2048)")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="install a chat template first (chatml, llama-3, qwen-2.5, ...)")


def add_sampling_args(p, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy decoding (default {temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def check_args(args, context: str) -> None:
    """All invalid flag values at once, as a ConfigError (exit code 2)."""
    from ..errors import ProblemList

    p = ProblemList(context)
    for flag, neutral in (("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
        value = getattr(args, flag)
        if value != value or value in (float("inf"), float("-inf")):
            p.add("--" + flag.replace("_", "-"), value, "a finite number", "pass a number such as 0.7")
            setattr(args, flag, neutral)  # reported; keeps the range checks below from repeating it
    if args.max_new_tokens <= 0:
        p.add("--max-new-tokens", args.max_new_tokens, "a positive integer", "e.g. --max-new-tokens 256")
    if args.max_seq_length <= 0:
        p.add("--max-seq-length", args.max_seq_length, "a positive integer", "e.g. --max-seq-length 2048")
    if args.temperature < 0:
        p.add("--temperature", args.temperature, "a number >= 0", "use 0 for greedy decoding")
    if not 0 < args.top_p <= 1:
        p.add("--top-p", args.top_p, "a number in (0, 1]", "e.g. --top-p 0.9")
    if args.top_k < 0:
        p.add("--top-k", args.top_k, "an integer >= 0", "use 0 to switch it off")
    if not 0 <= args.min_p < 1:
        p.add("--min-p", args.min_p, "a number in [0, 1)", "e.g. --min-p 0.1")
    if args.repetition_penalty <= 0:
        p.add("--repetition-penalty", args.repetition_penalty, "a positive number", "use 1.0 to switch it off")
    p.raise_if_any()


def load_for_inference(args):
    """(model, tokenizer) in inference mode."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..api import FastLanguageModel

    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the user and the chat
    precision = args.precision
    if precision == "auto":
        precision = "4bit" if torch.cuda.is_available() else "16bit"
    model, tokenizer = FastLanguageModel.from_pretrained(
        args.model, max_seq_length=args.max_seq_length, load_in_4bit=precision == "4bit",
        load_in_8bit=precision == "8bit", load_in_16bit=precision == "16bit")
    if args.chat_template:
        from ..training.chat_templates import install_chat_template

        tokenizer = install_chat_template(model, tokenizer, args.chat_template)
    FastLanguageModel.for_inference(model)
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos of the tokenizer and of the generation config, and the chat template's end-of-turn token."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    stop = getattr(tokenizer, "_fastlm_stop_token", None)
    if stop:
        candidates.append(tokenizer.convert_tokens_to_ids(stop))
    for token_id in candidates:
        if isinstance(token_id, int) and token_id >= 0 and token_id not in ids:
            ids.append(token_id)
    return ids


def encode(tokenizer, messages: list[dict] | None, text: str | None):
    """input_ids [1, T]: the conversation rendered with the chat template and a generation prompt, or raw text."""
    if messages is not None:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template already holds any bos token; do not add a second one
        return tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _streamer(tokenizer, out):
    from transformers import TextStreamer

    class _ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, tokenizer, input_ids, args, stream=None) -> Generation:
    """One completion of `input_ids` with the sampling flags in `args`; streamed to `stream` when given."""
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    stops = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=args.max_new_tokens, eos_token_id=stops or None,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0],
                  attention_mask=torch.ones_like(input_ids))
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
                      min_p=args.min_p or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if stream is not None:
        kwargs["streamer"] = _streamer(tokenizer, stream)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, **kwargs)
    seconds = time.perf_counter() - start
    new = output[0, input_ids.shape[1]:].tolist()
    finish = "stop" if new and new[-1] in stops else "length"
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text=text.strip() if finish == "stop" else text, prompt_tokens=input_ids.shape[1],
                      new_tokens=len(new), seconds=seconds, finish_reason=finish)


def err(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)
