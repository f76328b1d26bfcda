"""Jobs that compose the public API: the `fastlm train` run (train.py)."""
