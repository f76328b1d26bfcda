"""`fastlm` entry point: argparse with one subcommand per module (train, chat, generate, env).

Exit codes: 0 success, 1 a fastlm error (model not found, missing package, ...), 2 invalid configuration or
arguments (every problem listed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import chat, env, generate, train

SUBCOMMANDS = (train, chat, generate, env)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fastlm", description="Fast, memory-light fine-tuning and inference on the Hugging Face stack.",
        epilog="Run 'fastlm COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only warnings and errors from fastlm")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("fastlm")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.quiet)
    from ..errors import ConfigError, FastLMError

    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:  # its message names the context and lists every problem
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FastLMError as exc:
        print(f"fastlm {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
