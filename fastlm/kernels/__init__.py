"""Fast ops: one op per module (Triton kernel, launcher, autograd.Function) plus pure-torch references.

Import the op modules directly (``from fastlm.kernels.rms_norm import rms_norm``); this package imports nothing so
that importing one op never pulls in Triton or another op.
"""
