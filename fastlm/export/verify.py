"""Checks that an export computes what the model in memory computes.

Merged / LoRA exports are reloaded with transformers (and PEFT) and their logits compared with the in-memory model
on a few fixed prompts. Every check returns a report (printed, and saved as `fastlm_export_report.json` beside the
files); a failed check raises `ExportVerificationError`, which keeps the files and says what differed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import FastLMError
from ..state import base_model_of

logger = logging.getLogger(__name__)

REPORT_NAME = "fastlm_export_report.json"
VERIFY_TEXTS = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Question: what is 12 + 30? Answer: 42. Numbers: 0123456789 and symbols !?.,;'\"()",
)


class ExportVerificationError(FastLMError, RuntimeError):
    """An export was written but does not compute what the source model computes."""


def verify_inputs(tokenizer, max_tokens: int = 48) -> list[list[int]]:
    """Token ids of the fixed verification texts (plus one chat-formatted prompt when there is a template)."""
    texts = list(VERIFY_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                       tokenize=False, add_generation_prompt=True))
        except Exception:  # noqa: BLE001 - a template that rejects this conversation is not our check
            pass
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        if ids:
            out.append(list(ids))
    return out


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    """[T, V] fp32 logits of `model` for one sequence, in eval mode (the training flag is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(p.device for p in model.parameters())
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        return out.logits[0].float().cpu()
    finally:
        model.train(was_training)


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`, each from a full forward of the model in memory (no cache: the reference)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(logits_of(model, out)[-1].argmax()))
    return out[len(ids):]


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """Per-position distribution agreement of `test` with `ref` ([T, V] logits each)."""
    n = min(ref.shape[-1], test.shape[-1])
    ref, test = ref[..., :n].double(), test[..., :n].double()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "positions": int(ref.shape[0]),
        "max_abs_logit_diff": float((ref - test).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).double().mean()),
    }


def combine(rows: list[dict]) -> dict:
    """Token-weighted summary of several `compare_logits` results."""
    n = sum(r["positions"] for r in rows)
    return {
        "positions": n,
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "max_abs_logit": max(r["max_abs_logit"] for r in rows),
        "mean_kl": sum(r["mean_kl"] * r["positions"] for r in rows) / n,
        "max_kl": max(r["max_kl"] for r in rows),
        "top1_agreement": sum(r["top1_agreement"] * r["positions"] for r in rows) / n,
    }


def judge(metrics: dict, tier: str) -> list[str]:
    """Reasons the metrics fail their tier (empty when they pass).

    exact: same weights up to fp32 rounding (max logit difference <= 1e-3 relative to the logit scale);
    half: 16-bit rounding (mean KL <= 5e-3);
    quantized: 8/4-bit weights (mean KL <= 0.1 nats); report: measured only.
    """
    bad = []
    if tier == "exact":
        tol = 1e-3 * max(1.0, metrics["max_abs_logit"])
        if metrics["max_abs_logit_diff"] > tol:
            bad.append(f"max |logit difference| {metrics['max_abs_logit_diff']:.3g} > {tol:.3g}")
    elif tier == "half":
        if metrics["mean_kl"] > 5e-3:  # top-1 is reported, not judged: near-ties flip under 16-bit rounding
            bad.append(f"mean KL {metrics['mean_kl']:.3g} > 5e-3")
    elif tier == "quantized":
        if metrics["mean_kl"] > 0.1:
            bad.append(f"mean KL {metrics['mean_kl']:.3g} > 0.1")
    return bad


def tier_for(dtype: torch.dtype, quantized: bool) -> str:
    if quantized:
        return "quantized"
    return "exact" if dtype == torch.float32 else "half"


def save_report(directory: Path, report: dict, raise_on_failure: bool = True) -> dict:
    """Write the report beside the files, log a one-line summary per check, raise when a check failed."""
    directory = Path(directory)
    (directory / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    failed = []
    for check in report["checks"]:
        status = "ok" if check["passed"] else "FAILED"
        m = check.get("metrics", {})
        logger.warning("fastlm export check %-24s %s  mean KL %.3g  top-1 %.1f%%  max |dlogit| %.3g%s",
                       check["name"], status, m.get("mean_kl", float("nan")), 100 * m.get("top1_agreement", 0),
                       m.get("max_abs_logit_diff", float("nan")),
                       "" if check["passed"] else "  (" + "; ".join(check["problems"]) + ")")
        if not check["passed"]:
            failed.append(check)
    if failed and raise_on_failure:
        lines = [f"{c['name']}: " + "; ".join(c["problems"]) for c in failed]
        raise ExportVerificationError(
            f"the export in {str(directory)!r} was written but does not match the model in memory:\n  "
            + "\n  ".join(lines) + f"\nThe files are kept; the full report is {str(directory / REPORT_NAME)!r}. "
            "Pass verify=False to skip the check.")
    return report


def check(name: str, metrics: dict, tier: str, **extra) -> dict:
    problems = judge(metrics, tier)
    return {"name": name, "tier": tier, "passed": not problems, "problems": problems, "metrics": metrics, **extra}


def reload_exported(directory: Path, save_method: str, model, dtype: torch.dtype):
    """Load what `save_pretrained_merged` wrote, the way a user of transformers / PEFT would."""
    from transformers import AutoModelForCausalLM

    from .model_files import device_map

    if save_method == "lora":
        from peft import PeftModel

        from ..state import get_state

        import copy

        config = copy.deepcopy(base_model_of(model).config)  # the loaded config (RoPE scaling, resized vocab)
        kwargs = {}
        qc = getattr(config, "quantization_config", None)
        source = get_state(model).source.path
        if qc is not None:
            kwargs["quantization_config"] = qc
            # the base is loaded again from the source the way the model was: quantized on load from 16-bit weights
            # (the config then carries none: transformers would take the weights for quantized ones), or as the
            # quantized checkpoint it is, its config as a dict (transformers 5.17 reads it with .get; a CUDA
            # model's config holds the config object)
            if "quantization_config" in get_state(model).source.config:
                config.quantization_config = qc.to_dict() if hasattr(qc, "to_dict") else qc
            else:
                del config.quantization_config
        rows = base_model_of(model).get_input_embeddings().weight.shape[0]
        config.vocab_size = get_state(model).source.config.get("vocab_size", rows)
        base = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, device_map=device_map(),
                                                    **kwargs)
        if base.get_input_embeddings().weight.shape[0] != rows:
            base.resize_token_embeddings(rows)
        return PeftModel.from_pretrained(base, str(directory))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device_map())


def verify_reload(model, tokenizer, directory: Path, save_method: str, dtype: torch.dtype, quantized: bool) -> dict:
    """Reload the export and compare its logits with the in-memory model on the fixed prompts."""
    reloaded = reload_exported(directory, save_method, model, dtype)
    rows = [compare_logits(logits_of(model, ids), logits_of(reloaded, ids)) for ids in verify_inputs(tokenizer)]
    del reloaded
    metrics = combine(rows)
    tier = tier_for(dtype, quantized)
    return check(f"{save_method} reload", metrics, tier)
