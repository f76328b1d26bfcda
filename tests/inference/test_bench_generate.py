"""The benchmark command runs end to end on CPU (tiny-llama shape) and ends with one JSON line."""
import json

from fastlm.bench.generate import main


def test_bench_generate_cpu_prints_all_lines_and_json_last(capsys):
    result = main(["--shape", "tiny-llama", "--prompt-len", "8", "--new-tokens", "6", "--batches", "1,3",
                   "--lora-rank", "4", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    assert any(line.startswith("compile + capture:") for line in lines)
    for key in ("hf_tok_s_b1", "fastlm_tok_s_b1", "fastlm_tok_s_b3", "gbps_b1", "bandwidth_fraction_b1",
                "ttft_ms_b1", "copy_gbps", "warmup_s"):
        assert result[key] >= 0, key
    assert result["fastlm_tok_s_b1"] > 0 and 0 < result["bandwidth_fraction_b1"] < 1
    achieved = result["weight_bytes"] / 1e9 * result["fastlm_tok_s_b1"]
    assert abs(result["gbps_b1"] - achieved) <= 0.01 * achieved + 1e-3
