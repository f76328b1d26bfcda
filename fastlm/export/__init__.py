"""Exports that check themselves: merged 16-bit / 4-bit / LoRA, GGUF (verified in llama.cpp), TorchAO, ONNX, hub.

Methods are bound to model instances by `fastlm.export.methods.attach_export_methods`. Heavy and optional stacks
(gguf, llama-cpp-python, torchao, onnx) are imported inside the functions that need them.
"""
