"""`model.save_pretrained_onnx(dir, tokenizer)`: the merged model as an ONNX graph `input_ids [batch, seq] ->
logits [batch, seq, vocab]` (torch.onnx.export with the dynamo exporter and dynamic batch/sequence), beside the
config and tokenizer files; checked in onnxruntime against the model in memory.

With `kv_cache=True` (the default) a second graph, `model_with_past.onnx`, takes the past keys/values and returns
the present ones (see onnx_kv.py; `OnnxDecoder` runs it), checked on prefill + decode steps and a cached greedy
continuation. Each graph holds its own copy of the weights.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ProblemList
from ..state import get_state
from ..utils.imports import require
from ..utils.safe_write import atomic_directory, check_free_space, refuse_source_dir
from .merged import check_unknown_kwargs, write_merged
from .onnx_kv import WITH_PAST_NAME, export_with_past
from .model_files import write_model_files
from .weights import merged_nbytes

logger = logging.getLogger(__name__)

ONNX_INSTALL = 'pip install "fastlm[onnx]"'
ONNX_NAME = "model.onnx"


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def save_pretrained_onnx(model, save_directory, tokenizer=None, verify=True, overwrite=True, opset_version=None,
                         kv_cache=True, **kwargs) -> dict | None:
    p = ProblemList("save_pretrained_onnx")
    if not isinstance(kv_cache, bool):
        p.add("kv_cache", kv_cache, "True (also write model_with_past.onnx) or False", "pass kv_cache=True")
    if opset_version is not None and (not isinstance(opset_version, int) or opset_version < 18):
        p.add("opset_version", opset_version, "None or an ONNX opset >= 18", "leave it None")
    check_unknown_kwargs(p, kwargs, "remove it; see help(model.save_pretrained_onnx)")
    p.raise_if_any()
    require("onnx", "ONNX export", ONNX_INSTALL)
    require("onnxscript", "ONNX export (torch.onnx's dynamo exporter)", ONNX_INSTALL)
    if verify:
        require("onnxruntime", "checking the ONNX export (or pass verify=False)", ONNX_INSTALL)
    from transformers import AutoModelForCausalLM

    state = get_state(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(state, "tokenizer", None)
    target = refuse_source_dir(save_directory, model, "save_pretrained_onnx")
    size = merged_nbytes(model, torch.float32)
    check_free_space(target, (3 if kv_cache else 2) * size + (64 << 20), "save_pretrained_onnx")
    with atomic_directory(target, overwrite=overwrite, what="save_pretrained_onnx") as tmp:
        scratch = Path(tempfile.mkdtemp(prefix=".onnx-merged-", dir=tmp))  # inside: a kill leaves one temp dir
        try:
            write_merged(model, tokenizer, scratch, torch.float32, 5 << 30)
            merged = AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32, device_map="cpu").eval()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        example = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
        seq = torch.export.Dim("sequence", min=2, max=int(getattr(merged.config, "max_position_embeddings", 4096)))
        torch.onnx.export(_LogitsOnly(merged).eval(), (example,), str(tmp / ONNX_NAME), input_names=["input_ids"],
                          output_names=["logits"], dynamo=True, opset_version=opset_version,
                          dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: seq}},
                          external_data=size > (1 << 30))
        if kv_cache:
            export_with_past(merged, tmp / WITH_PAST_NAME, opset_version, external_data=size > (1 << 30))
        write_model_files(model, tokenizer, tmp, torch.float32)
        del merged
    logger.warning("fastlm: wrote ONNX export to %s", target)
    if not verify:
        return None
    import numpy as np
    import onnxruntime as ort

    from .verify import check, combine, compare_logits, logits_of, save_report, verify_inputs

    session = ort.InferenceSession(str(target / ONNX_NAME), providers=["CPUExecutionProvider"])
    rows = []
    for ids in verify_inputs(tokenizer):
        got = session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0][0]
        rows.append(compare_logits(logits_of(model, ids), torch.from_numpy(got)))
    tier = "quantized" if state is not None and state.quantization else "exact"
    checks = [check("onnxruntime", combine(rows), tier)]
    if kv_cache:
        from .onnx_kv import verify_with_past

        session = ort.InferenceSession(str(target / WITH_PAST_NAME), providers=["CPUExecutionProvider"])
        metrics, ref, got = verify_with_past(model, session, tokenizer, model.config)
        result = check("onnxruntime with past", metrics, tier, torch_greedy=ref, onnx_greedy=got)
        if tier == "exact" and got != ref:
            result["problems"].append(f"greedy continuation with the cache {got} differs from the model's {ref}")
            result["passed"] = False
        checks.append(result)
    return save_report(target, {"format": "onnx", "checks": checks})
