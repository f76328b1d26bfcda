"""bitsandbytes NF4 weights (with or without double quantization) -> dense bf16 / fp16 / fp32 weight.

Layout read (bitsandbytes >= 0.43, `Linear4bit.weight` + its `QuantState`):
- packed: uint8 (or any `quant_storage` dtype, viewed as uint8), ceil(n / 2) bytes for the n = out * in elements of
  the (out, in) weight flattened row-major; byte j holds element 2j in its high nibble and 2j + 1 in its low nibble.
- absmax: one scale per `blocksize` consecutive elements (the last block may be partial). Without double
  quantization it is fp32; with it (`quant_state.nested`) it is uint8 codes of a second blockwise quantization:
  scale[b] = code2[absmax[b]] * absmax2[b // blocksize2] + offset, all in fp32.
- element i = NF4[nibble(i)] * scale[i // blocksize], computed in fp32 and rounded once to `quant_state.dtype`,
  as bitsandbytes' CPU, CUDA and default kernels do. The result is bit-identical to
  `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`.

`dequantize_nf4` runs the Triton kernel on CUDA tensors and the pure-torch reference elsewhere; FP4 weights go
through bitsandbytes' own `dequantize_4bit`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch; CPU-only installs may lack it
    triton = None
    HAS_TRITON = False

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes stores them in fp32.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LEVELS_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_levels(device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _LEVELS_CACHE:
        _LEVELS_CACHE[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS_CACHE[device]


def _check(packed: torch.Tensor, quant_state, dtype) -> torch.dtype:
    dtype = dtype or quant_state.dtype
    if quant_state.quant_type != "nf4":
        raise ValueError(f"quant_type={quant_state.quant_type!r}: this kernel reads only 'nf4'. Fix: call "
                         "dequantize_nf4, which hands FP4 weights to bitsandbytes.functional.dequantize_4bit")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype={dtype}: the dequantized weight must be one of {OUT_DTYPES}. Fix: pass one of them")
    n = 1
    for d in quant_state.shape:
        n *= int(d)
    if packed.numel() * packed.element_size() < (n + 1) // 2:
        raise ValueError(f"packed weight has {packed.numel() * packed.element_size()} bytes but quant_state.shape="
                         f"{tuple(quant_state.shape)} needs {(n + 1) // 2}. Fix: pass the weight its quant_state "
                         "belongs to")
    return dtype


def _scales(quant_state) -> torch.Tensor:
    """The fp32 scale of every block (undoing the double quantization when nested)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    codes = s2.code[quant_state.absmax.long()]
    group = torch.arange(quant_state.absmax.numel(), device=codes.device) // s2.blocksize
    return codes * s2.absmax.float()[group] + torch.as_tensor(quant_state.offset, dtype=torch.float32,
                                                              device=codes.device)


def nf4_dequantize_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure torch. packed: uint8-viewable, >= ceil(n/2) bytes; returns quant_state.shape in `dtype`
    (default quant_state.dtype)."""
    dtype = _check(packed, quant_state, dtype)
    shape = tuple(int(d) for d in quant_state.shape)
    n = 1
    for d in shape:
        n *= d
    data = packed.reshape(-1).view(torch.uint8)[: (n + 1) // 2].long()
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n]
    scale = _scales(quant_state)
    block = torch.arange(n, device=data.device) // quant_state.blocksize
    values = nf4_levels(data.device)[nibbles] * scale[block]
    return values.to(dtype).reshape(shape)


if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr, out_ptr,
                            n_bytes, n, blocksize, blocksize2,
                            NESTED: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        """Each program turns BLOCK_BYTES packed bytes into 2 * BLOCK_BYTES weight elements."""
        pid = tl.program_id(0)
        byte_idx = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        mask_b = byte_idx < n_bytes
        byte = tl.load(packed_ptr + byte_idx, mask=mask_b, other=0).to(tl.int32)
        hi_idx = byte_idx * 2
        lo_idx = hi_idx + 1
        hi_blk = hi_idx // blocksize
        lo_blk = lo_idx // blocksize
        mask_hi = hi_idx < n
        mask_lo = lo_idx < n
        if NESTED:
            offset = tl.load(offset_ptr)
            q_hi = tl.load(absmax_ptr + hi_blk, mask=mask_hi, other=0).to(tl.int32)
            q_lo = tl.load(absmax_ptr + lo_blk, mask=mask_lo, other=0).to(tl.int32)
            s_hi = tl.load(code2_ptr + q_hi) * tl.load(absmax2_ptr + hi_blk // blocksize2, mask=mask_hi, other=0.0)
            s_lo = tl.load(code2_ptr + q_lo) * tl.load(absmax2_ptr + lo_blk // blocksize2, mask=mask_lo, other=0.0)
            s_hi = s_hi + offset
            s_lo = s_lo + offset
        else:
            s_hi = tl.load(absmax_ptr + hi_blk, mask=mask_hi, other=0.0)
            s_lo = tl.load(absmax_ptr + lo_blk, mask=mask_lo, other=0.0)
        v_hi = tl.load(levels_ptr + (byte >> 4)) * s_hi
        v_lo = tl.load(levels_ptr + (byte & 0xF)) * s_lo
        tl.store(out_ptr + hi_idx, v_hi.to(out_ptr.dtype.element_ty), mask=mask_hi)
        tl.store(out_ptr + lo_idx, v_lo.to(out_ptr.dtype.element_ty), mask=mask_lo)


def nf4_dequantize_triton(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1). Same contract as the reference;
    `out` (contiguous, quant_state.shape, `dtype`) is filled and returned when given."""
    if not HAS_TRITON:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("triton", "the NF4 dequantization kernel", "pip install triton")
    dtype = _check(packed, quant_state, dtype)
    shape = tuple(int(d) for d in quant_state.shape)
    n = 1
    for d in shape:
        n *= d
    data = packed.reshape(-1).view(torch.uint8)
    n_bytes = (n + 1) // 2
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    elif out.shape != torch.Size(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out: {tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}; expected a "
                         f"contiguous {shape} {dtype} tensor. Fix: pass out=None")
    if quant_state.nested:
        s2 = quant_state.state2
        absmax, absmax2, code2 = quant_state.absmax, s2.absmax.float(), s2.code.float()
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=data.device)  # no host sync
        blocksize2 = int(s2.blocksize)
    else:
        absmax = quant_state.absmax.float()
        absmax2 = code2 = offset = absmax  # unused
        blocksize2 = 1
    block_bytes = 1024
    grid = (triton.cdiv(n_bytes, block_bytes),)
    _nf4_dequant_kernel[grid](data, absmax, absmax2, code2, offset, nf4_levels(data.device), out,
                              n_bytes, n, int(quant_state.blocksize), blocksize2,
                              NESTED=bool(quant_state.nested), BLOCK_BYTES=block_bytes,
                              enable_fp_fusion=False)  # bitsandbytes rounds code2 * absmax2 before + offset
    return out


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of a bitsandbytes 4-bit parameter: Triton on CUDA, the torch reference on other devices,
    bitsandbytes itself for FP4. Returns quant_state.shape in `dtype` (default quant_state.dtype), rounded once
    to quant_state.dtype first as bitsandbytes' own matmul does."""
    if quant_state.quant_type != "nf4":
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(packed, quant_state)
    elif packed.is_cuda and HAS_TRITON:
        weight = nf4_dequantize_triton(packed, quant_state)
    else:
        weight = nf4_dequantize_reference(packed, quant_state)
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)
