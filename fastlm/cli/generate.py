"""`fastlm generate [MODEL_OR_DIR] --prompt TEXT`: one-shot generation.

The prompt is sent as a user message through the model's chat template (or as raw text with --raw). Greedy by
default, so the same prompt gives the same answer; --temperature > 0 samples. --json prints one JSON object per
prompt: model, prompt, completion, prompt_tokens, new_tokens, seconds, tokens_per_second, finish_reason.

    fastlm generate outputs/quickstart --prompt "What is the capital of Zorbania?"
    fastlm generate --prompt "Write a haiku" --temperature 0.8 --max-new-tokens 64 --json
"""
from __future__ import annotations

import json
import sys

from ._common import add_model_args, add_sampling_args, check_args, encode, generate, load_for_inference

HELP = "generate a completion for a prompt (one shot, optional JSON output)"


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("generate", help=HELP, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", "-p", action="append", required=True, metavar="TEXT",
                   help="the prompt; repeat for several; '-' reads it from standard input")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of plain text")
    p.add_argument("--stream", action="store_true", help="stream the text as it is generated (not with --json)")
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(run=run)


def run(args) -> int:
    check_args(args, "fastlm generate")
    prompts = [sys.stdin.read() if text == "-" else text for text in args.prompt]
    model, tokenizer = load_for_inference(args)
    use_template = not args.raw and bool(getattr(tokenizer, "chat_template", None))
    if not args.raw and not use_template:
        print("fastlm generate: the tokenizer has no chat template; sending the prompt as raw text "
              "(pass --chat-template NAME to use one)", file=sys.stderr)
    for prompt in prompts:
        if use_template:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                       [{"role": "user", "content": prompt}]
            input_ids = encode(tokenizer, messages, None)
        else:
            input_ids = encode(tokenizer, None, prompt)
        stream = sys.stdout if args.stream and not args.json else None
        result = generate(model, tokenizer, input_ids, args, stream=stream)
        if args.json:
            print(json.dumps({"model": args.model, "prompt": prompt, "completion": result.text,
                              "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
                              "seconds": round(result.seconds, 4),
                              "tokens_per_second": round(result.tokens_per_second, 2),
                              "finish_reason": result.finish_reason}, ensure_ascii=False), flush=True)
        elif stream is None:
            print(result.text, flush=True)
    return 0
