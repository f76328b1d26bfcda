"""`fastlm --help` (and every subcommand's --help) starts without importing the heavy stacks, so the CLI answers
at once. Whoever adds a subcommand module (export, serve, bench) keeps its heavy imports inside `run`; this test
fails otherwise."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastlm.cli.main import SUBCOMMANDS

from _cli_helpers import REPO, cli_env

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")

PROBE = """
import json, sys
from fastlm.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_imports_no_heavy_stack(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=cli_env(),
                         cwd=str(REPO), timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"`fastlm {' '.join(argv)}` imported {sorted(loaded & set(HEAVY))}"


def test_subcommands_are_modules_with_add_parser_and_run():
    import importlib

    for name in SUBCOMMANDS:
        module = importlib.import_module(f"fastlm.cli.{name}")
        assert callable(module.add_parser) and callable(module.run), name


def test_fastlm_package_import_is_light_and_names_resolve():
    probe = ("import sys, fastlm; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
             "print(heavy, 'is_bfloat16_supported' in dir(fastlm))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(),
                         cwd=str(REPO), timeout=120)
    assert out.stdout.strip() == "[] True", out.stdout + out.stderr
