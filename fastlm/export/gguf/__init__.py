"""GGUF export: converter (convert.py), tokenizer (vocab.py), llama.cpp quantizer (quantize.py), check (verify.py)."""
