"""`fastlm export`: a saved adapter directory becomes a checked GGUF / merged model; bad flags are all reported;
an unreachable hub leaves the complete export and says so."""
import argparse
import json

import pytest

from fastlm.cli import export as cli_export


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fastlm")
    cli_export.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def adapter_dir(tiny_model_factory, lora_model_factory, tmp_path):
    model, tok = lora_model_factory(tiny_model_factory("llama"))
    model.save_pretrained_merged(tmp_path / "adapter", tok, save_method="lora", verify=False)
    return tmp_path / "adapter"


def test_cli_exports_adapter_to_merged(adapter_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    args = _parse(["export", str(adapter_dir), "--format", "merged-16bit", "-o", str(tmp_path / "m"), "--json"])
    assert args.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"][0]["passed"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a plain transformers checkpoint


def test_cli_gguf(adapter_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    args = _parse(["export", str(adapter_dir), "-f", "gguf", "-q", "f32", "-q", "q8_0", "-o", str(tmp_path / "g")])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "gguf f32: ok" in out and "gguf q8_0: ok" in out
    assert (tmp_path / "g" / "model.Q8_0.gguf").is_file()


def test_cli_bad_flags(adapter_dir):
    from fastlm.errors import ConfigError

    args = _parse(["export", str(adapter_dir), "-f", "onnx", "-q", "q8_0", "--torchao-config", "int8"])
    with pytest.raises(ConfigError) as err:
        args.run(args)
    assert "--quantization" in str(err.value) and "--torchao-config" in str(err.value)
    args = _parse(["export", str(adapter_dir), "-f", "gguf", "--no-kv-cache"])
    with pytest.raises(ConfigError, match="--no-kv-cache.*only with --format onnx"):
        args.run(args)


def test_cli_onnx_without_the_kv_cache_graph(adapter_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    args = _parse(["export", str(adapter_dir), "-f", "onnx", "--no-kv-cache", "-o", str(tmp_path / "o")])
    assert args.run(args) == 0
    assert (tmp_path / "o" / "model.onnx").is_file()
    assert not (tmp_path / "o" / "model_with_past.onnx").exists()


def test_unreachable_hub_keeps_the_export(tiny_model_factory, lora_model_factory, tmp_path, monkeypatch):
    from fastlm.export.hub import HubUploadError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    model, tok = lora_model_factory(tiny_model_factory("llama"))
    with pytest.raises(HubUploadError, match="could not be reached|upload failed") as err:
        model.push_to_hub_merged("me/tiny", tok, save_method="lora", token="hf_x", save_directory=tmp_path / "local")
    assert str(tmp_path / "local") in str(err.value)
    assert (tmp_path / "local" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "local" / "fastlm_export_report.json").read_text())["checks"][0]["passed"]
