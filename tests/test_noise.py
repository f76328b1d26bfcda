"""What a newcomer sees: loading a 4-bit model, adding LoRA and building a TRL config print no warnings that the
user can do nothing about (bitsandbytes' missing optional kernel, transformers' FutureWarnings triggered by PEFT,
TRL and our own calls, a mismatched torchao build)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOISE = ("FutureWarning", "gemm_4bit_forward", "Failed to load", "is an Enum subclass", "is deprecated")

SCRIPT = """
import sys
from fastlm import FastLanguageModel, is_bfloat16_supported
model, tok = FastLanguageModel.from_pretrained(sys.argv[1], max_seq_length=64, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
from trl import SFTConfig
SFTConfig(output_dir=sys.argv[2], bf16=is_bfloat16_supported(), fp16=False, report_to="none")
FastLanguageModel.for_inference(model)
FastLanguageModel.for_training(model)
print("done")
"""


def test_load_lora_and_trl_config_are_quiet(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip().endswith("done"), out.stderr[-3000:]
    noisy = [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy)
