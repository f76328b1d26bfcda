"""The ONNX decoder graph with a KV cache (`model_with_past.onnx`), and how to run it.

Inputs: `input_ids [batch, sequence]` and, per layer i, `past_key_values.{i}.key` / `.value`
`[batch, kv_heads, past, head_dim]` (past may be 0: the prefill). Outputs: `logits [batch, sequence, vocab]` and
`present.{i}.key` / `.value` `[batch, kv_heads, past + sequence, head_dim]`, which are the next call's past.
Positions are `past .. past + sequence - 1`; every row of a batch has the same length (no padding mask).
"""
from __future__ import annotations

import numpy as np
import torch

WITH_PAST_NAME = "model_with_past.onnx"


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the cache tensors."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", None) or heads), int(head_dim)


def past_names(n_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


class _WithPast(torch.nn.Module):
    """`(input_ids, [k0, v0, k1, v1, ...]) -> (logits, k0', v0', ...)` through transformers' DynamicCache."""

    def __init__(self, model, n_layers: int):
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, input_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        start = past[0].shape[2]
        positions = (torch.arange(input_ids.shape[1], device=input_ids.device) + start).unsqueeze(0)
        out = self.model(input_ids=input_ids, position_ids=positions.expand(input_ids.shape[0], -1),
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_with_past(merged, path, opset_version=None, external_data: bool = False) -> None:
    """Write the KV-cache graph of the (merged, fp32) transformers model `merged` to `path`."""
    n_layers, kv_heads, head_dim = cache_shape(merged.config)
    max_len = int(getattr(merged.config, "max_position_embeddings", 4096))
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=max_len)
    past = torch.export.Dim("past", min=0, max=max_len)
    example = (torch.tensor([[1, 2, 3]]), [torch.zeros(1, kv_heads, 4, head_dim) for _ in range(2 * n_layers)])
    names = past_names(n_layers)
    torch.onnx.export(_WithPast(merged, n_layers).eval(), example, str(path), input_names=["input_ids", *names],
                      output_names=["logits", *past_names(n_layers, "present")], dynamo=True,
                      opset_version=opset_version, external_data=external_data,
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * (2 * n_layers)})


class OnnxDecoder:
    """Runs `model_with_past.onnx` in onnxruntime: `step(ids)` feeds new tokens and keeps the cache."""

    def __init__(self, session, config):
        self.session = session
        self.n_layers, self.kv_heads, self.head_dim = cache_shape(config)
        self.names = past_names(self.n_layers)
        self.reset()

    def reset(self, batch: int = 1) -> None:
        self.past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.names]

    def step(self, input_ids) -> np.ndarray:
        """Logits `[batch, len(input_ids[0]), vocab]` of the new tokens, after everything fed before."""
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
        feed.update(zip(self.names, self.past))
        logits, *self.past = self.session.run(None, feed)
        return logits

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt, one cached step per token."""
        self.reset()
        logits = self.step([prompt])
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos_token_id:
                break
            logits = self.step([[token]])
        return out


def verify_with_past(model, session, tokenizer, config, new_tokens: int = 8) -> tuple[dict, list[int], list[int]]:
    """Compare the cached graph with the model in memory: each verify text fed as a prefill of its first half and
    one decode step per remaining token (logits of every position), and a greedy continuation with the cache."""
    from .verify import combine, compare_logits, greedy_tokens, logits_of, verify_inputs

    decoder = OnnxDecoder(session, config)
    rows = []
    inputs = verify_inputs(tokenizer)
    for ids in inputs:
        half = max(1, len(ids) // 2)
        decoder.reset()
        parts = [decoder.step([ids[:half]])[0]] + [decoder.step([[t]])[0] for t in ids[half:]]
        rows.append(compare_logits(logits_of(model, ids), torch.from_numpy(np.concatenate(parts))))
    prompt = inputs[0][:16]
    return combine(rows), greedy_tokens(model, prompt, new_tokens), decoder.greedy(prompt, new_tokens)
