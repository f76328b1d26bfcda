"""`fastlm chat [MODEL_OR_DIR]`: an interactive, streaming, multi-turn chat using the model's chat template.

Type a message and press Enter. Commands: /reset starts a new conversation, /exit (or /quit, or end of input)
leaves. Lines are read from standard input, so a conversation can also be piped in:

    printf 'What is the capital of Zorbania?\\n/exit\\n' | fastlm chat outputs/quickstart

Replies go to standard output; the prompt, notices and --stats lines go to standard error.
"""
from __future__ import annotations

import sys

from ._common import add_model_args, add_sampling_args, check_args, encode, err, generate, load_for_inference

HELP = "chat with a model or a trained adapter (multi-turn, streaming)"
COMMANDS = {"/reset": "start a new conversation", "/exit": "leave (also /quit, or end of input)",
            "/help": "show the commands"}


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("chat", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system prompt for every conversation")
    p.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    p.add_argument("--stats", action="store_true", help="after each reply print prompt tokens, new tokens and "
                   "tokens/s to standard error")
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(run=run, top_p=0.9)


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run(args) -> int:
    check_args(args, "fastlm chat")
    model, tokenizer = load_for_inference(args)
    if not getattr(tokenizer, "chat_template", None):
        from ..errors import ProblemList

        p = ProblemList("fastlm chat")
        p.add("model", args.model, "a model whose tokenizer has a chat template",
              "pass --chat-template chatml (or the template of the model's family), or use fastlm generate --raw")
        p.raise_if_any()
    interactive = sys.stdin.isatty()
    err(f"fastlm chat with {args.model}. Commands: " + ", ".join(COMMANDS) + ".")
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(base)
            err("(new conversation)")
            continue
        if command == "/help" or command.startswith("/") and " " not in command:
            err("\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items()))
            continue
        history.append({"role": "user", "content": line})
        input_ids = encode(tokenizer, history, None)
        out = None if args.no_stream else sys.stdout
        result = generate(model, tokenizer, input_ids, args, stream=out)
        if args.no_stream:
            print(result.text, flush=True)
        history.append({"role": "assistant", "content": result.text})
        if args.stats:
            err(f"[{result.prompt_tokens} prompt tokens, {result.new_tokens} new tokens, "
                f"{result.tokens_per_second:.1f} tok/s, {result.finish_reason}]")
    return 0
