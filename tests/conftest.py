"""Shared test set-up: JAX on the CPU, deterministic, quiet."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The compile cache (config compile_cache, under XDG_CACHE_HOME) goes to a folder of this
# session, removed at exit, never to the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vsdjax-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
