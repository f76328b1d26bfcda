"""ThroughputCallback and LossPlotCallback on a real TRL SFTTrainer over a tiny llama."""
from __future__ import annotations

import math

import torch

import pytest

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from fixtures.tiny import build_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm.training import callbacks as callbacks_module  # noqa: E402
from fastlm.training.callbacks import LossPlotCallback, ThroughputCallback, save_loss_plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "A red cat."}],
]


def make_trainer(model_dir, output_dir, callbacks, max_steps=4, **config):
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                         learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                         **{"save_strategy": "no", **config})
    dataset = datasets.Dataset.from_list([{"messages": CONVERSATIONS[i % 2]} for i in range(8)])
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora,
                          callbacks=callbacks)


def assert_png(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0


def test_throughput_history_per_logging_step_and_loss_plot(tiny_llama_dir, tmp_path):
    throughput, plot = ThroughputCallback(), LossPlotCallback()
    trainer = make_trainer(tiny_llama_dir, tmp_path / "out", [throughput, plot], max_steps=4)
    trainer.train()

    assert [h["step"] for h in throughput.history] == [1, 2, 3, 4]
    for entry in throughput.history:
        assert math.isfinite(entry["loss"]) and entry["learning_rate"] > 0
        assert entry["tokens_per_second"] > 0
        expected_kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        assert entry["peak_memory_gb"] > 0 and entry["memory_kind"] == expected_kind
    # 4 steps x 2 examples = the whole dataset once: the count is its exact number of (non-padding) tokens
    assert throughput.history[-1]["tokens"] == sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    assert throughput.token_count_kind == "non-padding tokens"
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert all("tokens_per_second" in e and "peak_memory_gb" in e for e in logged)

    summary = throughput.summary()
    assert summary["steps"] == 4 and summary["tokens_per_second"] > 0
    assert summary["final_loss"] == throughput.history[-1]["loss"]
    assert summary["train_time_s"] > 0 and summary["peak_memory_gb"] > 0

    png = tmp_path / "out" / "loss.png"
    assert plot.path == png and png.exists()
    assert_png(png)
    assert [p.name for p in png.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_loss_plot_includes_history_from_before_resume(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_trainer(tiny_llama_dir, out, [], max_steps=2, save_strategy="steps", save_steps=2).train()

    seen = {}

    def spy(log_history, path):
        seen["steps"] = [e["step"] for e in log_history if "loss" in e]
        return save_loss_plot(log_history, path)

    monkeypatch.setattr(callbacks_module, "save_loss_plot", spy)
    plot = LossPlotCallback()
    make_trainer(tiny_llama_dir, out, [plot], max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert seen["steps"] == [1, 2, 3, 4]
    assert_png(out / "loss.png")


def test_save_loss_plot_writes_png_with_eval_and_without_points(tmp_path):
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.5}]
    path = save_loss_plot(history, tmp_path / "sub" / "loss.png")
    assert_png(path)
    empty = save_loss_plot([{"step": 3, "train_loss": 1.0}], tmp_path / "empty.png")
    assert_png(empty)
