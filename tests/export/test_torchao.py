"""torchao export: int8 reloads exactly equal to the quantized model; int4 (Intx on CPU) reloads; QAT int4 trains a
few steps and converts to a real int4 model that computes what the fake-quantized model computed."""
import pytest
import torch

pytest.importorskip("torchao")


@pytest.mark.parametrize("config", ["int8", "int4"])
def test_torchao_reload(config, tiny_model_factory, lora_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    report = model.save_pretrained_torchao(tmp_path / "t", tok, torchao_config=config)
    exact, vs_model = report["checks"]
    assert exact["passed"] and exact["metrics"]["max_abs_logit_diff"] == 0.0
    assert vs_model["passed"] and vs_model["metrics"]["mean_kl"] < 0.05
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "t", device_map="cpu",
                                                use_safetensors=any((tmp_path / "t").glob("*.safetensors")))
    assert "torchao" in str(back.config.quantization_config)
    weight = back.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")


def test_qat_int4_trains_and_converts(tiny_model_factory, tmp_path):
    from fastlm import FastLanguageModel
    from fastlm.export.methods import attach_export_methods
    from fastlm.export.qat import prepare_qat

    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_factory("llama")), full_finetuning=True,
                                                   max_seq_length=128)
    attach_export_methods(model)
    prepare_qat(model, "int4")
    assert "FakeQuantized" in type(model.model.layers[0].self_attn.q_proj).__name__
    ids = torch.tensor([tok("the capital of france is paris. the capital of france is paris.")["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    report = model.save_pretrained_torchao(tmp_path / "q", tok)
    assert "IntxWeightOnlyConfig" in report["config"]
    vs_model = report["checks"][1]
    # the converted int4 model computes what the fake-quantized model trained with
    assert vs_model["metrics"]["mean_kl"] < 1e-3 and vs_model["metrics"]["top1_agreement"] > 0.95


def test_cuda_int4_without_its_kernels_names_the_fix_before_writing(tiny_model_factory, lora_model_factory, tmp_path,
                                                                    monkeypatch):
    """On a GPU whose torchao cannot run its int4 layout (the H100 image: "Requires mslk >= 1.0.0"), the export
    stops before writing anything with an error that says what to install or which config to use instead."""
    from fastlm.export import torchao as ta

    model, tok = lora_model_factory(tiny_model_factory("llama"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def probe(config):
        raise ImportError("Requires mslk >= 1.0.0")

    monkeypatch.setattr(ta, "_probe_cuda_int4", probe)
    with pytest.raises(RuntimeError, match=r'mslk.*pip install mslk.*torchao_config="int8"'):
        model.save_pretrained_torchao(tmp_path / "t", tok, torchao_config="int4")
    assert not (tmp_path / "t").exists()
