"""Benchmarks: fastlm beside plain HF on random-weight models of named real shapes (train and generate)."""
