"""NF4 dequantization (torch reference and Triton kernel under the interpreter) bit-exact against bitsandbytes."""
import importlib


import pytest
import torch

# These run the Triton kernels on CPU tensors through the interpreter (tests/conftest.py turns it on on machines
# without CUDA); a GPU machine checks the compiled kernels with scripts/gpu_lora_check.py instead.
if torch.cuda.is_available():
    pytest.skip("interpreter tests of the fused LoRA / NF4 kernels; on CUDA run scripts/gpu_lora_check.py",
                allow_module_level=True)

bnbf = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("triton")

# (shape, blocksize, double quantization): sizes that are not multiples of the block, a partial last byte (odd
# element count), one element, more than 256 blocks (several second-level groups), more than one kernel program.
CASES = [((100, 70), 64, True), ((33, 17), 64, True), ((300, 129), 128, False), ((1, 1), 64, True),
         ((257, 255), 64, True), ((64, 2050), 32, True), ((48, 96), 256, False)]


def _module():
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module("fastlm.kernels.nf4_dequant")
    if not isinstance(mod._nf4_dequant_kernel, InterpretedFunction):
        mod = importlib.reload(mod)
    return mod


def _quantized(shape, blocksize, nested, dtype, storage=torch.uint8, seed=0):
    torch.manual_seed(seed)
    weight = (torch.randn(shape) * 0.05).to(dtype)
    weight.view(-1)[:: 7] *= 40  # outliers make blocks' scales differ widely
    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                              quant_storage=storage)


def test_levels_are_bitsandbytes_nf4_code():
    mod = _module()
    _, state = _quantized((4, 64), 64, False, torch.float32)
    assert torch.equal(mod.nf4_levels("cpu"), state.code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize,nested", CASES)
def test_reference_bit_exact(shape, blocksize, nested, dtype):
    mod = _module()
    packed, state = _quantized(shape, blocksize, nested, dtype)
    expected = bnbf.dequantize_4bit(packed, state)
    got = mod.nf4_dequantize_reference(packed, state)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize,nested", CASES)
def test_triton_bit_exact(shape, blocksize, nested, dtype):
    mod = _module()
    packed, state = _quantized(shape, blocksize, nested, dtype)
    expected = bnbf.dequantize_4bit(packed, state)
    if dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 instead of rounding (the GPU rounds to nearest even, checked by
        # scripts/gpu_lora_check.py); the fp32 values the kernel computes round to bitsandbytes' bf16 exactly.
        got = mod.nf4_dequantize_triton(packed, state, dtype=torch.float32).to(torch.bfloat16)
    else:
        got = mod.nf4_dequantize_triton(packed, state)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_quant_storage_and_layer_weight():
    """A Linear4bit layer's own weight (packed in bf16 storage for FSDP-style loading) dequantizes exactly."""
    mod = _module()
    packed, state = _quantized((40, 96), 64, True, torch.bfloat16, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    expected = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(mod.nf4_dequantize_reference(packed, state), expected)
    assert torch.equal(mod.nf4_dequantize_triton(packed, state, dtype=torch.float32).to(torch.bfloat16), expected)
    assert torch.equal(mod.dequantize_nf4(packed, state, dtype=torch.float32), expected.float())


def test_out_buffer_and_errors():
    mod = _module()
    packed, state = _quantized((10, 64), 64, True, torch.float32)
    buf = torch.empty(10, 64)
    assert mod.nf4_dequantize_triton(packed, state, out=buf) is buf
    assert torch.equal(buf, bnbf.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="out=None"):
        mod.nf4_dequantize_triton(packed, state, out=torch.empty(64, 10))
    with pytest.raises(ValueError, match="quant_state belongs to"):
        mod.nf4_dequantize_reference(packed[:5], state)
    with pytest.raises(ValueError, match="must be one of"):
        mod.nf4_dequantize_reference(packed, state, dtype=torch.int8)
    fp4_packed, fp4_state = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="FP4"):
        mod.nf4_dequantize_triton(fp4_packed, fp4_state)
    # the dispatcher hands FP4 to bitsandbytes
    assert torch.equal(mod.dequantize_nf4(fp4_packed, fp4_state), bnbf.dequantize_4bit(fp4_packed, fp4_state))
