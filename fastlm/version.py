"""The fastlm version, in a module that imports nothing (the CLI reads it without loading the package API)."""
__version__ = "0.1.0"
