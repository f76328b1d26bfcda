"""`fastlm train CONFIG.yaml [key=value ...]`: fine-tune from a typed YAML config.

    fastlm train examples/quickstart.yaml
    fastlm train examples/quickstart.yaml training.max_steps=10 output.dir=outputs/try
    fastlm train examples/quickstart.yaml resume=true      # continue after a crash or kill -9
    fastlm train examples/quickstart.yaml --dry-run        # check the config and the data, load no model
"""
from __future__ import annotations

import json
import sys

HELP = "fine-tune a model from a YAML config"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=__doc__, formatter_class=_raw())
    p.add_argument("config", metavar="CONFIG.yaml", help="the training config (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides with dotted keys, values in YAML syntax: training.max_steps=10 resume=true")
    p.add_argument("--dry-run", action="store_true", help="check everything a run checks before it loads the "
                   "model (config, output directory, every data row), then stop")
    p.add_argument("--print-config", action="store_true", help="print the full config (defaults filled in) and "
                   "stop")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout at the end")
    p.set_defaults(run=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    from ..training.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.dry_run:
        from ..jobs.train import check_before_loading

        _, _, data = check_before_loading(config)
        print(f"config OK: {len(data.train)} training rows ({data.format} format)"
              + (f", {len(data.eval)} evaluation rows" if data.eval is not None else "")
              + f"; {config.trainer.type} on {config.model.name} ({config.model.precision}"
              + (", full fine-tuning" if config.model.full_finetuning else f", LoRA r={config.lora.r}")
              + f") -> {config.output.dir}")
        return 0
    from ..jobs.train import train_from_config

    result = train_from_config(config, verbose=True)
    if args.json:
        print(json.dumps(result.summary, default=str), flush=True)
    elif result.model_dir is not None:
        print(f"\nTry it: fastlm chat {result.model_dir}", file=sys.stderr)
    return 0
