"""`fastlm serve MODEL_OR_DIR [--host 127.0.0.1] [--port 8000]`: an OpenAI-compatible HTTP server on the engine.

Routes: /v1/chat/completions, /v1/completions (both with "stream": true as server-sent events), /v1/models.
Concurrent requests decode together (continuous batching over --max-num-seqs slots). MODEL_OR_DIR is a model, a
merged fine-tune or a LoRA adapter directory (such as the output.dir of fastlm train).

    fastlm serve outputs/quickstart --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...)
"""
from __future__ import annotations

HELP = "serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming)"


def add_parser(sub) -> None:
    import argparse

    from ._common import add_model_args

    p = sub.add_parser("serve", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: MODEL_OR_DIR)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    p.set_defaults(run=run)


def check(args) -> None:
    from ..errors import ProblemList

    p = ProblemList("fastlm serve")
    if not 0 <= args.port <= 65535:
        p.add("--port", args.port, "0..65535", "e.g. --port 8000")
    if args.max_num_seqs < 1:
        p.add("--max-num-seqs", args.max_num_seqs, "an integer >= 1", "e.g. --max-num-seqs 16")
    if args.max_seq_length <= 0:
        p.add("--max-seq-length", args.max_seq_length, "a positive integer", "e.g. --max-seq-length 2048")
    p.raise_if_any()


def run(args, ready=None) -> int:
    """Load, then serve until interrupted. `ready(server)` (tests) is called once listening, with the running
    server; it runs in the background then and the caller closes it."""
    import sys

    check(args)
    from ..inference.attach import attach_inference_methods, enable_fast_generate
    from ..inference.server import start_server
    from ._common import load_for_inference

    model, tokenizer = load_for_inference(args)
    attach_inference_methods(model)
    enable_fast_generate(model)
    name = args.served_model_name or str(args.model)
    server = start_server(model, tokenizer, host=args.host, port=args.port, model_name=name,
                          max_num_seqs=args.max_num_seqs, max_len=args.max_seq_length, background=ready is not None)
    if ready is not None:
        ready(server)
        return 0
    print(f"fastlm serve: stopped ({server.url})", file=sys.stderr)
    return 0
