"""Compile the decode kernels for sm_90 on this machine (Triton's bundled ptxas and nvdisasm; no GPU needed) and
report, per kernel and USE_PDL, what its SASS does before griddepcontrol.wait (ACQBULK): the global bytes a thread
loads, whether it stores, and whether the wait and the trigger (PREEXIT, griddepcontrol.launch_dependents) exist.

    python tests/kernels/pdl_sass.py  ->  one JSON object per line

Run without TRITON_INTERPRET (test_pdl.py starts it in a subprocess): interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
_SIZES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _load_bytes(line: str) -> int:
    op = re.search(r"\bLDG(\.[A-Z0-9_]+)*", line).group(0)
    for part in op.split(".")[1:]:
        if part in _SIZES:
            return _SIZES[part]
    return 4


def before_wait(sass: str) -> dict:
    """What the SASS does before its first ACQBULK (the whole kernel when there is none)."""
    lines = [line for line in sass.splitlines() if re.search(r"\b[A-Z][A-Z0-9_.]+\b", line)]
    waits = [i for i, line in enumerate(lines) if re.search(r"\bACQBULK\b", line)]
    head = lines[:waits[0]] if waits else lines
    return {"wait": bool(waits), "trigger": any(re.search(r"\bPREEXIT\b", line) for line in lines),
            "load_bytes": sum(_load_bytes(line) for line in head if re.search(r"\bLDG\b", line)),
            "stores": sum(1 for line in head if re.search(r"\b(STG|ATOMG|RED)\b", line))}


def compile_sass(kernel, types: dict, constexprs: dict, num_warps: int) -> str:
    """SASS of `kernel` (a triton.jit function): `types` the runtime arguments' Triton types in order (pointers and
    integers 16-divisible, as a launch on real tensors specialises them), `constexprs` the rest."""
    names = kernel.arg_names
    sig = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name, ty in types.items()
             if ty.startswith("*") or ty == "i32"}
    pdl = bool(constexprs.get("USE_PDL", 0))
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "launch_pdl": pdl}).asm["sass"]


def _ptrs(names: str, ty: str) -> dict:
    return {name: ty for name in names.split()}


def cases():
    """(name, kernel, types, constexprs, num_warps, facts to report) for each kernel of the decode step."""
    from fastlm.kernels import decode_attention, decode_epilogue, decode_gemv, decode_nf4, decode_nf4_prmt

    gemv_types = {**_ptrs("x_ptr w_ptr", "*bf16"), "out_ptr": "*fp32",
                  **_ptrs("N K stride_x stride_w stride_os stride_or", "i32")}
    split_types = {**_ptrs("q_ptr k_ptr v_ptr", "*bf16"), "pos_ptr": "*i64", **_ptrs("m_ptr l_ptr acc_ptr", "*fp32"),
                   **_ptrs("stride_pos stride_qb stride_qh stride_kb stride_kh stride_kl L CHUNK SPLITS window",
                           "i32"), "scaling": "fp32", "softcap": "fp32"}
    combine_types = {**_ptrs("m_ptr l_ptr acc_ptr", "*fp32"), "out_ptr": "*bf16", "SPLITS": "i32"}
    prmt_types = {"x_ptr": "*i32", "w_ptr": "*i32", "absmax_ptr": "*fp32", "regs_ptr": "*i32", "y_ptr": "*bf16",
                  **_ptrs("M N K words_per_row n_scales", "i32")}
    word_types = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "y_ptr": "*bf16",
                  **_ptrs("N K", "i32")}
    prmt_const = dict(BLOCKSIZE=64, BLOCK_N=4, BLOCK_W=128, PREFETCH=True, F16=False, USE_ASM=True, EVEN=True,
                      IDX32=True)
    for pdl in (0, 1, 2):
        yield ("gemv", decode_gemv._gemv_partials_kernel, gemv_types,
               dict(BLOCK_N=16, BLOCK_K=512, STEPS=2, USE_PDL=pdl), 4)
    yield ("gemv_steps4", decode_gemv._gemv_partials_kernel, gemv_types,
           dict(BLOCK_N=16, BLOCK_K=256, STEPS=4, USE_PDL=1), 4)
    yield ("attention_split", decode_attention._decode_attention_split_kernel, split_types,
           dict(G=4, BLOCK_G=16, D=64, BLOCK_D=64, BLOCK_L=32, HAS_SOFTCAP=False, HAS_WINDOW=False, USE_DOT=True,
                DOT_PRECISION="tf32", USE_PDL=1), 4)
    yield ("attention_combine", decode_attention._decode_attention_combine_kernel, combine_types,
           dict(D=64, BLOCK_D=64, BLOCK_SPLITS=16, BLOCK_S=16, USE_PDL=1), 4)
    yield ("nf4_prmt", decode_nf4_prmt._nf4_gemv_prmt_kernel, prmt_types,
           dict(prmt_const, X_DIRECT=True, X_IN_ASM=True, SCALE_IN_ASM=True, USE_PDL=1), 4)
    yield ("nf4_prmt_rows", decode_nf4_prmt._nf4_gemv_prmt_rows_kernel, prmt_types,
           dict(prmt_const, ROWS=2, USE_PDL=1), 4)
    epi = dict(BLOCK_R=16, SP=4, SP_XA=1, USE_PDL=1)
    yield ("epilogue_qkv", decode_epilogue._qkv_rope_cache_kernel,
           {**_ptrs("y_ptr xa_ptr", "*fp32"), "bt_ptr": "*bf16", **_ptrs("cos_ptr sin_ptr", "*fp32"), "pos_ptr": "*i64",
            **_ptrs("q_ptr kc_ptr vc_ptr", "*bf16"),
            **_ptrs("stride_ys stride_y stride_xas stride_xa stride_bt stride_cos stride_q stride_cb stride_ch "
                    "stride_cl R XQ XK XV S S_XA", "i32")},
           dict(epi, H=32, KV=8, HALF=32, BLOCK_HALF=32), 1)
    yield ("epilogue_act", decode_epilogue._lora_act_mul_kernel,
           {**_ptrs("y_ptr xa_ptr", "*fp32"), **_ptrs("bt_ptr h_ptr", "*bf16"),
            **_ptrs("stride_ys stride_y stride_xas stride_xa stride_bt stride_h R INTER XG XU S S_XA", "i32")},
           dict(epi, ACT=0, BLOCK=32), 4)
    yield ("epilogue_norm", decode_epilogue._lora_residual_norm_kernel,
           {"x_ptr": "*bf16", **_ptrs("y_ptr xa_ptr", "*fp32"), **_ptrs("bt_ptr w_ptr s_ptr out_ptr", "*bf16"),
            "count_ptr": "*i32",
            **_ptrs("stride_x stride_ys stride_y stride_xas stride_xa stride_bt stride_s stride_out R XOFF HIDDEN",
                    "i32"), "eps": "fp32", **_ptrs("S S_XA", "i32")},
           dict(epi, BLOCK=128, ROW_BLOCK=2048, GEMMA=False, SPLIT=True), 2)
    yield ("nf4_word", decode_nf4._nf4_gemv_word_kernel, word_types,
           dict(BLOCKSIZE=64, BLOCK_N=4, BLOCK_W=64, PREFETCH=True, USE_PDL=1), 4)


def main() -> int:
    for name, kernel, types, constexprs, warps in cases():
        facts = before_wait(compile_sass(kernel, types, constexprs, warps))
        print(json.dumps({"kernel": name, "use_pdl": constexprs["USE_PDL"], "threads": 32 * warps, **facts}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
