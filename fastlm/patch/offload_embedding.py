"""Keep the input embedding matrix in CPU memory (`offload_embedding=True`): saves vocab x hidden x 2 bytes of GPU
memory. Token ids go to the CPU for the lookup and the (small) activations come back to the GPU."""
from __future__ import annotations

import functools

from ..errors import ConfigError, Problem


def offload_embedding(model):
    """Move the input embedding to CPU with device-moving hooks. Returns the undo (hooks removed, table moved back)."""
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if out is not None and out.weight is embed.weight:
        raise ConfigError("FastLanguageModel.from_pretrained", [Problem(
            "offload_embedding", True, "this model ties its embedding to lm_head, which must stay on the GPU",
            "remove offload_embedding for models with tie_word_embeddings=True")])
    device = embed.weight.device
    embed.to("cpu")
    handles = [embed.register_forward_pre_hook(_inputs_to_cpu),
               embed.register_forward_hook(functools.partial(_output_to, device))]
    return PutBack(embed, handles, device)


def _inputs_to_cpu(module, args):
    return tuple(a.to("cpu") if hasattr(a, "to") else a for a in args)


def _output_to(device, module, args, output):
    return output.to(device, non_blocking=True)


class PutBack:
    """The undo: hooks removed, table moved back. It holds the embedding and the hook handles as attributes, so a
    deep copy of the model gets an undo of its own embedding (the handles follow the copied hook dicts)."""

    def __init__(self, embed, handles, device):
        self.embed, self.handles, self.device = embed, handles, device

    def __call__(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.embed.to(self.device)
