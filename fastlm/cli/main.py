"""`fastlm` entry point: argparse with one subcommand per module.

Each subcommand is a module `fastlm/cli/<name>.py` with `HELP`, `add_parser(sub)` and `run(args)`; adding one is one
entry in `SUBCOMMANDS`. Subcommand modules import nothing heavy at module level (torch, transformers, peft, trl,
datasets load inside `run`), so `fastlm --help` starts in a fraction of a second; tests/cli/test_startup.py keeps
that true.

Exit codes: 0 success, 1 a fastlm error (model not found, missing package, ...), 2 invalid configuration or
arguments (every problem listed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["train", "chat", "generate", "serve", "export", "bench", "env"]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="fastlm", description="Fast, memory-light fine-tuning and inference on the Hugging Face stack.",
        epilog="Run 'fastlm COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only warnings and errors from fastlm")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __package__).add_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the message (main() may run several times in one process,
    e.g. under pytest's capture, which replaces sys.stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("fastlm")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
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
    from ..utils.noise import silence_known_noise

    silence_known_noise()
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
