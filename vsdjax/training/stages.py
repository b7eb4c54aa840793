"""Runs that start from other runs: ProlificDreamer's stages chained by `init_from`.

  stage 1  representation "nerf"           experiments/vsd.py           (toy.py)
  stage 2  representation "dmtet"          experiments/vsd_geometry.py  (toy_geometry.py)
  stage 3  representation "textured_mesh"  experiments/vsd_texture.py   (toy_texture.py)

A later stage names the previous stage's work directory in `init_from`; its
particle count comes from there (`inherit`). `previous(config)` reads the
chain of runs behind a config, nearest first, as (config, particles) pairs:
the run's config.json and the particles of its newest checkpoint.
"""

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from vsdjax import checks
from vsdjax.training import workdir as workdir_lib


def load_run(workdir: str) -> tuple:
  """(config, particles [n, ...] host arrays) of a finished or interrupted run."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise checks.ConfigError(f"config field init_from={workdir!r}: no config.json there")
  if not workdir_lib.has_checkpoint(workdir):
    raise checks.ConfigError(
      f"config field init_from={workdir!r}: no checkpoint in {workdir_lib.checkpoint_dir(workdir)}"
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(workdir_lib.with_added_fields(json.load(f)))
  mngr = ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir))
  state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
  return config, {k: v for k, v in state["particles"].items()}


def previous(config) -> tuple:
  """The runs behind `config` through init_from, nearest first: ((config, particles), ...)."""
  runs, seen, workdir = [], set(), config.init_from
  while workdir:
    workdir = os.path.abspath(workdir)
    if workdir in seen:
      raise checks.ConfigError(f"config field init_from: {workdir} starts from itself")
    seen.add(workdir)
    run = load_run(workdir)
    runs.append(run)
    workdir = run[0].get("init_from", "")
  return tuple(runs)


def inherit(config) -> None:
  """Sets config.n_particles to init_from's (a later stage trains the same particles)."""
  if not config.init_from:
    return
  path = os.path.join(config.init_from, "config.json")
  if not os.path.isfile(path):
    raise checks.ConfigError(f"config field init_from={config.init_from!r}: no config.json there")
  with open(path) as f:
    config.n_particles = int(json.load(f)["n_particles"])
