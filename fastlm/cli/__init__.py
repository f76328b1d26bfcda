"""The `fastlm` command: `fastlm train`, `fastlm chat`, `fastlm generate`, `fastlm env` (one module each)."""
