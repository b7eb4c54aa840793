"""The persistent compilation cache (config `compile_cache`): a second process reads the
train step that the first compiled; the folder is not part of a run's identity."""

import json
import os
import subprocess
import sys

import jax
import pytest

from helpers import tiny_config
from vsdjax import checks, train
from vsdjax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: the 2D SDS toy for one step (exports skipped), counting JAX's cache hits.
RUN = """
import json, sys
import jax
from helpers import tiny_config
from vsdjax import train

hits = []
jax.monitoring.register_event_listener(
  lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)
train.export_all = lambda *args: None
config = tiny_config(
  steps=1, representation="image", n_particles=1, compile_cache=sys.argv[1],
  **{"guidance.mode": "sds"},
)
train.train_and_evaluate(config, sys.argv[2])
print(json.dumps({"hits": len(hits)}))
"""


def _run(cache: str, workdir: str) -> int:
  """Cache hits of one training process."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  }
  out = subprocess.run(
    [sys.executable, "-c", RUN, cache, workdir],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])["hits"]


def _step_entries(cache: str) -> set:
  """The train step's cache entries (files named after the jitted step_fn)."""
  return {name for name in os.listdir(cache) if name.startswith("jit_step_fn-")}


@pytest.mark.slow  # two processes that each build and run the step: ~30 s
def test_second_process_reads_the_train_step_from_the_cache(tmp_path):
  cache = str(tmp_path / "cache")
  assert _run(cache, str(tmp_path / "first")) == 0
  written = _step_entries(cache)
  assert len(written) == 1
  assert _run(cache, str(tmp_path / "second")) >= 1
  # Another key for the same step would have compiled (seconds) and written a second entry.
  assert _step_entries(cache) == written


def test_resume_accepts_another_cache_folder(tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lib.record_config(tiny_config(compile_cache=str(tmp_path / "a")), workdir, False)
  os.makedirs(os.path.join(workdir_lib.checkpoint_dir(workdir), "2"))
  assert workdir_lib.check_resume(tiny_config(compile_cache=""), workdir)
  with pytest.raises(checks.ConfigError, match="seed"):
    workdir_lib.check_resume(tiny_config(compile_cache="", seed=1), workdir)


def test_a_folder_that_cannot_be_created_turns_the_cache_off(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  before = jax.config.jax_compilation_cache_dir
  train.use_compile_cache(str(blocker / "cache"))
  assert jax.config.jax_compilation_cache_dir == before
  assert "cannot be created" in capsys.readouterr().err
