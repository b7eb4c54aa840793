"""Shared test set-up: JAX on the CPU, deterministic, quiet."""
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
warnings.filterwarnings("ignore", message="Flax classes are deprecated")

# Test modules import `experiments.*` configs and the `tiny_sd` helper module.
import sys  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]
