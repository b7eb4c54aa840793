"""Random weights shaped like a pytree of abstract arrays, for the benchmarks.

Drawn on the host with numpy and put on the device leaf by leaf: one jitted
program drawing every leaf of the SD UNet took over two minutes to compile on
a GPU (H200, jax 0.11.2), while numpy draws its 866 M values in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_like(abstract, seed: int, dtype=None):
  """Arrays shaped like `abstract` (arrays or jax.ShapeDtypeStructs).

  Leaves named "kernel" are N(0, 1 / fan_in) (fan_in: all axes but the
  last), "bias" 0, "scale" 1, every other leaf N(0, 1) (embeddings).

  Args:
    abstract: pytree whose leaves have .shape and .dtype.
    seed: numpy seed; the same seed gives the same arrays.
    dtype: dtype of every output leaf; None keeps each leaf's own.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", None) if path else None
    out_dtype = dtype or leaf.dtype
    if name in ("bias", "scale"):
      return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, out_dtype)
    value = rng.standard_normal(leaf.shape, dtype=np.float32)
    if name == "kernel":
      value *= 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value).astype(out_dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)
