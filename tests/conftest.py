"""Shared test set-up: JAX on the CPU, deterministic, quiet."""
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
warnings.filterwarnings("ignore", message="Flax classes are deprecated")
