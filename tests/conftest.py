"""Shared test set-up: JAX on the CPU, deterministic, quiet."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
