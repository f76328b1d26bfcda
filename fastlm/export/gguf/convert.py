"""fastlm's own HF -> GGUF converter, written on the `gguf` package (no llama.cpp sources or binaries).

Per family: the llama.cpp architecture name, its hyper-parameters, tensor names through gguf's name map, and the
tensor transforms llama.cpp expects: Llama/Mistral Q and K rows are permuted from the HF rotate-half layout to
llama.cpp's interleaved RoPE layout; Gemma norms are stored as (1 + w) because llama.cpp multiplies by the stored
weight. f32 / f16 / bf16 / q8_0 are written directly (gguf's numpy quantizers); other types are made from an f32/
f16 file by llama.cpp's quantizer (see quantize.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ...errors import UnsupportedFeatureError
from .rope import rope_tensors, write_rope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's LLAMA arch uses interleaved RoPE pairs
    norm_plus_one: bool = False  # Gemma: RMSNorm weight applied as (1 + w)
    softcaps: bool = False
    sliding_window: bool = False


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("LLAMA", permute_qk=True),
    "mistral": GGUFFamily("LLAMA", permute_qk=True),
    "qwen2": GGUFFamily("QWEN2"),
    "qwen3": GGUFFamily("QWEN3"),
    "gemma": GGUFFamily("GEMMA", norm_plus_one=True),
    "gemma2": GGUFFamily("GEMMA2", norm_plus_one=True, softcaps=True, sliding_window=True),
    "gemma3_text": GGUFFamily("GEMMA3", norm_plus_one=True, sliding_window=True),
    "phi3": GGUFFamily("PHI3", sliding_window=True),
}

# what a file type is written as: gguf quantization type for 2-D weights
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")


def family_of(config) -> GGUFFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedFeatureError(
            f"GGUF export does not support model_type {model_type!r} yet. Supported: {sorted(FAMILIES)}. Fix: export "
            "with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py.")
    return FAMILIES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config, fam: GGUFFamily) -> None:
    hd = head_dim(config)
    n_head = config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(int(hd))
    writer.add_value_length(int(hd))
    writer.add_vocab_size(int(config.vocab_size))
    write_rope(writer, config, fam.arch)
    if fam.softcaps:
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if fam.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    if fam.arch in ("GEMMA2", "GEMMA3"):
        scalar = getattr(config, "query_pre_attn_scalar", hd)
        if scalar not in (hd, config.hidden_size // n_head):
            raise UnsupportedFeatureError(
                f"{config.model_type} with query_pre_attn_scalar={scalar} (head_dim {hd}) has no llama.cpp "
                "equivalent; llama.cpp scales attention by 1/sqrt(head_dim).")


def _permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head (rows [n_heads*hd, ...])."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_tensors(items: Iterable[tuple[str, torch.Tensor]], config, fam: GGUFFamily):
    """Yield `(gguf name, float32 numpy array)` from `(HF checkpoint name, tensor)` items."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, tensor in items:
        if hf_name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None and hf_name == "lm_head.weight" and fam.arch in ("GEMMA", "GEMMA2"):
            raise UnsupportedFeatureError(
                f"llama.cpp's {config.model_type} architecture always uses the input embedding as the output layer, "
                "but this model has a separate lm_head (tie_word_embeddings=False). Fix: export with "
                "save_pretrained_merged.")
        if new is None:
            raise UnsupportedFeatureError(
                f"GGUF export: no llama.cpp name for tensor {hf_name!r} of {config.model_type}. Fix: report this; "
                "meanwhile export with save_pretrained_merged.")
        data = tensor.detach().to(torch.float32)
        if fam.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_rows(data, n_head)
        elif fam.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_rows(data, n_kv)
        if fam.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0
        yield new, data.numpy()
    yield from rope_tensors(config, fam.arch)


def tensor_type(name: str, data: np.ndarray, file_type: str):
    """The GGML type one tensor is stored as for a file type (1-D tensors and odd rows stay float)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim <= 1 or file_type == "f32":
        return T.F32
    if file_type == "f16":
        return T.F16
    if file_type == "bf16":
        return T.BF16
    if file_type == "q8_0":
        return T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    raise ValueError(file_type)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(path: Path, items: Iterable[tuple[str, torch.Tensor]], config, tokenizer, file_type: str,
               name: str | None = None) -> Path:
    """Write one GGUF file of `file_type` (f32/f16/bf16/q8_0) from merged HF tensors."""
    import gguf

    from .vocab import write_vocab

    fam = family_of(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, fam.arch)])
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    write_hparams(writer, config, fam)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, tokenizer, config)
    for gguf_name, data in gguf_tensors(items, config, fam):
        qtype = tensor_type(gguf_name, data, file_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
