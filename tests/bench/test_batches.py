"""The padding-free benchmark trains the same sequences packed (fastlm side) and padded (HF side): both layouts must
give the same loss on the same model, so the losses of the two sides can be compared at all."""
import torch
from transformers import AutoModelForCausalLM

from fastlm.bench.batches import make_batch
from fastlm.bench.shapes import shape_config


def test_packed_and_padded_batches_give_the_same_loss_and_tokens():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape_config("tiny-llama"), attn_implementation="sdpa").eval()
    padded = make_batch(seed=5, step=1, batch=3, seq_len=80, vocab_size=512, layout="padded")
    packed = make_batch(seed=5, step=1, batch=3, seq_len=80, vocab_size=512, layout="packed")
    assert padded["tokens"] == packed["tokens"] == packed["input_ids"].shape[1]
    assert padded["input_ids"].shape[0] == 3 and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packed position_ids only without a KV cache
        loss_padded = model(**{k: v for k, v in padded.items() if k != "tokens"}, use_cache=False).loss
        loss_packed = model(**{k: v for k, v in packed.items() if k != "tokens"}, use_cache=False).loss
        # without per-sequence position_ids the packed row is one long sequence: a different loss
        loss_unmasked = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert abs(loss_unmasked.item() - loss_padded.item()) > 1e-4


def test_batches_repeat_exactly_for_the_same_seed_and_step():
    a = make_batch(seed=1, step=2, batch=2, seq_len=16, vocab_size=100, layout="dense")
    b = make_batch(seed=1, step=2, batch=2, seq_len=16, vocab_size=100, layout="dense")
    c = make_batch(seed=1, step=3, batch=2, seq_len=16, vocab_size=100, layout="dense")
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (2, 16) and a["tokens"] == 32
