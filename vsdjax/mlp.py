"""A tiny multilayer perceptron as pure functions.

Parameters are a dict `{'layer_0': {'w': [in, out], 'b': [out]}, ...}` so that
they are a plain pytree (vmap-able over a leading particle axis, checkpointable
by orbax). Layers use He-uniform weights (suited to ReLU) and zero biases, so
at initialisation the output is a zero-mean function of the input with no
constant offset; the field relies on this to start from its density bias alone.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from vsdjax import checks


def init(key: jax.Array, sizes: Sequence[int]) -> dict:
  """Initialises an MLP.

  Args:
    key: PRNG key.
    sizes: layer widths `[in, hidden..., out]`, at least two entries, all >= 1.

  Returns:
    `{'layer_i': {'w': [sizes[i], sizes[i + 1]], 'b': [sizes[i + 1]]}}` in
    float32, for `i` in `range(len(sizes) - 1)`.
  """
  sizes = tuple(sizes)
  if len(sizes) < 2:
    raise ValueError(f"sizes must have at least 2 entries, got {sizes}")
  sizes = tuple(checks.check_int(f"sizes[{i}]", s) for i, s in enumerate(sizes))
  keys = jax.random.split(key, len(sizes) - 1)
  w_init = jax.nn.initializers.he_uniform()
  return {
    f"layer_{i}": {
      "w": w_init(k, (n_in, n_out), jnp.float32),
      "b": jnp.zeros((n_out,), jnp.float32),
    }
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def apply(
  params: dict,
  x: jnp.ndarray,
  activation: Callable[[jnp.ndarray], jnp.ndarray] = jax.nn.relu,
) -> jnp.ndarray:
  """Applies the MLP.

  Args:
    params: from `init`.
    x: `[..., sizes[0]]` inputs.
    activation: elementwise non-linearity between layers (none after the last).

  Returns:
    `[..., sizes[-1]]` outputs.
  """
  n = len(params)
  x = jnp.asarray(x)
  for i in range(n):
    layer = params[f"layer_{i}"]
    x = x @ layer["w"] + layer["b"]  # [..., sizes[i + 1]]
    if i < n - 1:
      x = activation(x)
  return x
