"""The NF4 dequant-GEMV kernel equals dequantize-then-matmul and bitsandbytes' own dequantization."""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # run the kernel on CPU tensors (tests/conftest.py sets this before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

bnb_functional = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("triton")


def _decode_nf4():
    """fastlm.kernels.decode_nf4 with its kernel under the interpreter on CPU (reloaded if an earlier import
    decorated it for a GPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import decode_nf4

    if not torch.cuda.is_available() and not isinstance(decode_nf4._nf4_gemv_word_kernel, InterpretedFunction):
        decode_nf4 = importlib.reload(decode_nf4)
    return decode_nf4


@pytest.mark.parametrize("n, k, m, nested", [(96, 128, 1, True), (40, 200, 3, False), (17, 64, 2, True),
                                             (48, 512, 1, True), (22, 256, 2, False), (12, 1600, 1, True)])
def test_nf4_gemv_matches_reference_and_bitsandbytes(n, k, m, nested):
    kern = _decode_nf4()
    nf4_absmax_fp32, nf4_dequantize_reference = kern.nf4_absmax_fp32, kern.nf4_dequantize_reference
    nf4_gemv, nf4_gemv_reference = kern.nf4_gemv, kern.nf4_gemv_reference
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cpu")
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    absmax = nf4_absmax_fp32(state)
    code = state.code.float()
    dense = nf4_dequantize_reference(packed, absmax, code, n, k, 64)
    torch.testing.assert_close(dense, bnb_functional.dequantize_4bit(packed, state).float(), rtol=1e-5, atol=1e-5)
    assert (dense - w).abs().mean() < 0.15  # really a 4-bit approximation of w
    x = torch.randn(m, k, device="cpu")
    got = nf4_gemv(x, packed, absmax, code, n, k, 64)
    torch.testing.assert_close(got, nf4_gemv_reference(x, packed, absmax, code, n, k, 64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, x @ dense.t(), rtol=1e-4, atol=1e-4)
    for config in [c for c in kern._CONFIGS if c[4] == 0]:  # every word-kernel config the tuning may pick (the
        # prmt variants: test_decode_nf4_prmt.py)
        got = nf4_gemv(x, packed, absmax, code, n, k, 64, config=config)
        torch.testing.assert_close(got, x @ dense.t(), rtol=1e-4, atol=1e-4, msg=f"config {config}")


def test_engine_reads_nf4_layers_as_4bit_and_matches_bitsandbytes(tiny_model_factory):
    from fastlm import FastLanguageModel
    from fastlm.inference.engine import Engine

    _decode_nf4()
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), max_seq_length=64,
                                                   load_in_4bit=True)
    torch.manual_seed(1)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    FastLanguageModel.for_inference(model)
    prompt = tok("the cat is red")["input_ids"]
    outs = []
    for fuse in (False, True):
        eng = Engine(model, max_slots=1, max_len=32, fuse=fuse)
        first = eng.prefill([0], [prompt])
        step = eng.decode(first.argmax(-1), torch.tensor([len(prompt)]))  # one row: the NF4 GEMV path
        outs.append((first, step))
    assert eng.view.layers[0].qkv.kind == "nf4" and eng.view.layers[0].down.kind == "nf4"
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
