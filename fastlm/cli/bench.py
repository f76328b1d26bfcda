"""`fastlm bench train|generate`: plain Hugging Face against fastlm on a random-weight model of a real shape.

    fastlm bench train --shape llama-3.2-1b --batch 4 --seq-len 2048      # LoRA training: tokens/s, peak GB, losses
    fastlm bench train --shape llama-3.2-1b --max-context                # longest sequence that trains at batch 1
    fastlm bench generate ...                                            # generation (see its --help)

Each prints a table and, last, one JSON line. Run 'fastlm bench train --help' for the options.
"""
from __future__ import annotations

import argparse

HELP = "benchmark training or generation against plain transformers/PEFT (table + JSON line)"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")

    from ..bench.train import __doc__ as train_doc
    from ..bench.train import add_arguments

    train = bench_sub.add_parser("train", help="LoRA training speed, memory and loss agreement; --max-context",
                                 description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(train)
    train.set_defaults(run=run_train)

    # generate's options belong to fastlm.bench.generate; everything after the word is passed to it unparsed
    generate = bench_sub.add_parser("generate", help="generation speed (fastlm.bench.generate; '--help' for options)",
                                    add_help=False, prefix_chars="\0")
    generate.add_argument("argv", nargs=argparse.REMAINDER)
    generate.set_defaults(run=run_generate)
    p.set_defaults(run=lambda args: _usage(p))


def _usage(parser) -> int:
    import sys

    parser.print_help(sys.stderr)
    return 2


def run_train(args) -> int:
    from ..bench.train import run

    return run(args)


def run_generate(args) -> int:
    from ..errors import UnsupportedFeatureError

    try:
        from ..bench import generate
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastlm.bench.generate",):
            raise
        raise UnsupportedFeatureError(
            "the generation benchmark (fastlm.bench.generate) is not part of this fastlm version yet. "
            "Fix: use 'fastlm bench train', or update fastlm.") from None
    return int(generate.main(list(args.argv)) or 0)


def run(args) -> int:
    """The subcommand contract's entry point: the benchmark chosen on the command line runs (its parser set it)."""
    if args.run is run:
        raise SystemExit("usage: fastlm bench {train,generate} ...")
    return args.run(args)
