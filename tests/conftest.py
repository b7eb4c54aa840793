"""Shared test set-up: JAX on the CPU, deterministic, quiet."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The compile cache (config compile_cache, under XDG_CACHE_HOME) goes to a folder of this
# session, removed at exit, never to the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vsdjax-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(work directory, config, final state) of one tiny run, shared by the preview,
  TensorBoard and report tests: 2D (image particles) with SDS, the cheapest to compile
  (7 s on the 2-core CPU; a NeRF with VSD: 108 s), previews at steps 2 and 4."""
  from helpers import tiny_config
  from vsdjax import train

  config = tiny_config(
    steps=4,
    preview_every=2,
    checkpoint_every=4,
    representation="image",
    **{"guidance.mode": "sds"},
  )
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  state = train.train_and_evaluate(config, workdir)
  return workdir, config, state
