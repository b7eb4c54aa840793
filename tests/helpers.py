"""Helpers shared by several test modules."""

import jax
from jax.extend import core as jex
import numpy as np

from vsdjax import defaults
from vsdjax.representations.nerf import scene


def random_particle(spec: scene.SceneSpec, seed: int) -> dict:
  """A particle with scene.init's structure, drawn with numpy (no compile).

  Weights He-uniform and biases zero as in mlp.init; grid features uniform in
  +-0.3 (not hashgrid.init's +-1e-4) so that albedo and density vary in space.
  """
  rng = np.random.default_rng(seed)
  shapes_ = jax.eval_shape(lambda k: scene.init(k, spec), jax.random.PRNGKey(0))

  def draw(path, leaf):
    name = path[-1].key
    if name == "w":
      limit = np.sqrt(6.0 / leaf.shape[0])
    elif name == "tables":
      limit = 0.3
    else:
      return np.zeros(leaf.shape, np.float32)
    return rng.uniform(-limit, limit, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes_)


def walk(tree, path=()):
  """Yields (path, leaf) of a nested dict, independently of the code under test."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from walk(v, path + (k,))
    else:
      yield path + (k,), v


def get(tree, path):
  """The leaf of a nested dict at `path`."""
  for k in path:
    tree = tree[k]
  return tree


def tiny_config(**overrides):
  """The analytic prior at toy sizes (two references, 2 particles, 4 steps); `overrides`
  maps dotted field names to values."""
  c = defaults.get_config()
  c.steps = 4
  c.n_particles = 2
  c.prompt = ""
  c.prior.kind = "analytic"
  c.prior.references = "sphere:#d04040,cube:#3060c0"
  c.guidance.scale = 1.0
  c.guidance.t_switch_step = 2
  c.guidance.view_prompts = False
  c.eps_phi.base = "tiny"
  c.eps_phi.mode = "full"
  c.eps_phi.tiny_channels = (64,)
  c.scene.n_levels = 2
  c.scene.log2_table_size = 8
  c.scene.hidden = 8
  c.scene.density_activation = "trunc_exp"  # as experiments/toy.py
  c.scene.background = "white"
  c.scene.random_bg_prob = 0.0
  c.render.resolution = 8
  c.render.resolution_after = 8
  c.render.n_samples = 8
  c.render.chunk = 8
  c.render.occupancy_grid = 8  # small: the grid update evaluates G^3 points
  c.render.ray_batch = 32  # two batches of the 8x8 rays: exercises lax.map
  c.log_every = 1
  c.checkpoint_every = 2
  c.export.views = 1
  c.export.video_frames = 2
  c.export.resolution = 16
  c.export.mesh_resolution = 16
  c.export.eval_views = 2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def sharded_config(representation: str, steps: int, particles: int = 0, views: int = 0):
  """tiny_config for the sharding tests: 4 particles, 2 views per step, checkpoint at 2."""
  return tiny_config(
    representation=representation,
    n_particles=4,
    views_per_step=2,
    steps=steps,
    checkpoint_every=2,
    **{"sharding.particles": particles, "sharding.views": views, "export.eval_views": 1},
  )


def leaves(state):
  """The arrays of a state as numpy, in tree order."""
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, pjit, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jex.Jaxpr):
          yield from eqns(sub)
