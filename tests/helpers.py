"""Helpers shared by several test modules."""
import jax
import numpy as np

from vsdjax import scene


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
