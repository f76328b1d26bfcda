"""Keep the input embedding matrix in CPU memory (`offload_embedding=True`): saves vocab x hidden x 2 bytes of GPU
memory. Token ids go to the CPU for the lookup and the (small) activations come back to the GPU."""
from __future__ import annotations

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

    def to_cpu(module, args):
        return tuple(a.to("cpu") if hasattr(a, "to") else a for a in args)

    def to_gpu(module, args, output):
        return output.to(device, non_blocking=True)

    handles = [embed.register_forward_pre_hook(to_cpu), embed.register_forward_hook(to_gpu)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        embed.to(device)

    return undo
