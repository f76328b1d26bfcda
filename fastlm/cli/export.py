"""`fastlm export MODEL_OR_DIR --format FORMAT`: write a trained model (or a saved LoRA adapter with its base) as a
merged checkpoint, an adapter, GGUF files, a torchao or an ONNX model, each checked against the model it came from
(the report is printed and saved beside the files), optionally pushed to the Hugging Face Hub.

    fastlm export outputs/quickstart --format gguf -q q8_0 -q q4_k_m -o outputs/quickstart-gguf
    fastlm export outputs/quickstart --format merged-16bit --push-to-hub me/quickstart
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "export a model: merged 16/4-bit, LoRA, GGUF (llama.cpp-checked), torchao, ONNX"
FORMATS = ("merged-16bit", "merged-4bit", "lora", "gguf", "torchao", "onnx")


def add_parser(sub) -> None:
    import argparse

    from ..loading.embedded import EMBEDDED_MODEL_NAME

    p = sub.add_parser("export", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=EMBEDDED_MODEL_NAME, metavar="MODEL_OR_DIR",
                   help="a model name, a model directory or a saved LoRA adapter directory")
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="target directory (default: MODEL_OR_DIR-FORMAT beside the model, or ./NAME-FORMAT)")
    p.add_argument("--quantization", "-q", action="append", default=None, metavar="METHOD",
                   help="GGUF method (q8_0, f16, bf16, f32, q4_k_m, q5_k_m, q6_k, ...); repeat for several "
                        "(default q8_0)")
    p.add_argument("--torchao-config", default=None, choices=("int8", "int8-dynamic", "int4"),
                   help="torchao scheme (default int8)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the model in 4-bit first (merged exports still read the original 16-bit weights)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the loaded model")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="onnx: write only model.onnx, not the KV-cache graph model_with_past.onnx")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the result to this hub repo")
    p.add_argument("--token", default=None, help="Hugging Face token for --push-to-hub")
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(run=run)


def check_args(args) -> None:
    from ..errors import ProblemList

    p = ProblemList("fastlm export")
    if args.quantization and args.format != "gguf":
        p.add("--quantization", args.quantization, "only with --format gguf", "drop -q or use --format gguf")
    if args.torchao_config and args.format != "torchao":
        p.add("--torchao-config", args.torchao_config, "only with --format torchao", "drop it or use --format torchao")
    if getattr(args, "no_kv_cache", False) and args.format != "onnx":
        p.add("--no-kv-cache", True, "only with --format onnx", "drop it or use --format onnx")
    p.raise_if_any()


def default_output(model: str, fmt: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().parent / f"{path.resolve().name}-{fmt}"
    return Path(f"{model.rstrip('/').rsplit('/', 1)[-1]}-{fmt}")


def export(model, tokenizer, args, output: Path) -> dict | None:
    """Run one export on a loaded model; returns its verification report."""
    common = dict(verify=not args.no_verify)
    if args.format in ("merged-16bit", "merged-4bit", "lora"):
        method = {"merged-16bit": "merged_16bit", "merged-4bit": "merged_4bit", "lora": "lora"}[args.format]
        return model.save_pretrained_merged(output, tokenizer, save_method=method, **common)
    if args.format == "gguf":
        return model.save_pretrained_gguf(output, tokenizer, quantization_method=args.quantization or ["q8_0"],
                                          **common)
    if args.format == "torchao":
        return model.save_pretrained_torchao(output, tokenizer, torchao_config=args.torchao_config, **common)
    return model.save_pretrained_onnx(output, tokenizer, kv_cache=not args.no_kv_cache, **common)


def run(args) -> int:
    check_args(args)
    from ..api import FastLanguageModel
    from ..export.methods import attach_export_methods

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, load_in_4bit=args.load_in_4bit)
    from ..state import base_model_of

    attach_export_methods(base_model_of(model))  # until from_pretrained attaches them itself
    attach_export_methods(model)
    output = Path(args.output) if args.output else default_output(args.model, args.format)
    report = export(model, tokenizer, args, output)
    if args.json and report is not None:
        print(json.dumps(report, default=str))
    elif report is not None:
        for c in report["checks"]:
            m = c["metrics"]
            print(f"{c['name']}: {'ok' if c['passed'] else 'FAILED'}  mean KL {m['mean_kl']:.3g}  "
                  f"top-1 {m['top1_agreement']:.1%}  max |dlogit| {m['max_abs_logit_diff']:.3g}")
    print(f"wrote {output}", file=sys.stderr)
    if args.push_to_hub:
        from ..export.hub import upload_folder

        print(upload_folder(output, args.push_to_hub, token=args.token, private=args.private or None))
    return 0
