"""The background: a colour per view direction, and random solid colours.

The unit view direction is encoded by real spherical harmonics of `degree`
bands (degree**2 values), then a small ReLU MLP with two hidden layers and a
sigmoid gives an RGB colour in [0, 1].

During training, with probability `prob` per render, the whole background is
replaced by one random solid colour, uniform in [0, 1]^3 (ProlificDreamer's
setting: 50%), which keeps the scene from hiding content in the background.
"""

import math

import jax
import jax.numpy as jnp

from vsdjax import checks, mlp

MAX_DEGREE = 4


def init(key: jax.Array, hidden: int = 32, degree: int = 3) -> dict:
  """Initial background parameters.

  Args:
    key: PRNG key.
    hidden: width of the two hidden layers.
    degree: spherical-harmonic bands, 1..MAX_DEGREE (degree**2 inputs).

  Returns:
    {'mlp': MLP degree**2 -> hidden -> hidden -> 3} (see mlp.py).
  """
  hidden = checks.check_int("hidden", hidden)
  degree = checks.check_int("degree", degree)
  checks.check_range("degree", degree, 1, MAX_DEGREE)
  return {"mlp": mlp.init(key, [degree**2, hidden, hidden, 3])}


def spherical_harmonics(d: jnp.ndarray, degree: int) -> jnp.ndarray:
  """Real spherical harmonics of unit directions (tiny-cuda-nn's order and signs).

  Orthonormal on the unit sphere: the integral of Y_i Y_j over it is
  delta_ij.

  Args:
    d: [..., 3] unit directions (x, y, z).
    degree: number of bands, 1..MAX_DEGREE.

  Returns:
    [..., degree**2] values, band by band.
  """
  x, y, z = d[..., 0], d[..., 1], d[..., 2]  # [...]
  xx, yy, zz = x * x, y * y, z * z
  out = [jnp.full_like(x, 0.28209479177387814)]
  if degree > 1:
    out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
  if degree > 2:
    out += [
      1.0925484305920792 * x * y,
      -1.0925484305920792 * y * z,
      0.94617469575755997 * zz - 0.31539156525251999,
      -1.0925484305920792 * x * z,
      0.54627421529603959 * (xx - yy),
    ]
  if degree > 3:
    out += [
      0.59004358992664352 * y * (yy - 3.0 * xx),
      2.8906114426405538 * x * y * z,
      0.45704579946446572 * y * (1.0 - 5.0 * zz),
      0.3731763325901154 * z * (5.0 * zz - 3.0),
      0.45704579946446572 * x * (1.0 - 5.0 * zz),
      1.4453057213202769 * z * (xx - yy),
      0.59004358992664352 * x * (3.0 * yy - xx),
    ]
  return jnp.stack(out, axis=-1)


def color(params: dict, directions: jnp.ndarray) -> jnp.ndarray:
  """Background colour seen along each view direction.

  Args:
    params: from `init`.
    directions: [..., 3] view (ray) directions, any non-zero length.

  Returns:
    [..., 3] RGB in [0, 1].
  """
  directions = jnp.asarray(directions)
  degree = math.isqrt(params["mlp"]["layer_0"]["w"].shape[0])  # degree**2 inputs
  sq = jnp.sum(directions * directions, axis=-1, keepdims=True)  # [..., 1]
  unit = directions * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))  # [..., 3]
  feats = spherical_harmonics(unit, degree)  # [..., degree**2]
  return jax.nn.sigmoid(mlp.apply(params["mlp"], feats))  # [..., 3]


def solid_or_mlp(key: jax.Array, mlp_rgb: jnp.ndarray, prob) -> jnp.ndarray:
  """With probability `prob`, one random solid colour for the whole render.

  Args:
    key: PRNG key, one per render (vmap over renders for a batch).
    mlp_rgb: [R, 3] (or [..., 3]) background colours of one render's rays.
    prob: probability in [0, 1] of replacing them (a float or scalar array).

  Returns:
    [R, 3]: `mlp_rgb` unchanged, or one colour uniform in [0, 1]^3 on every
    ray.
  """
  mlp_rgb = jnp.asarray(mlp_rgb)
  k_use, k_colour = jax.random.split(key)
  use_solid = jax.random.uniform(k_use) < prob  # []
  solid = jax.random.uniform(k_colour, (3,), mlp_rgb.dtype)  # [3]
  return jnp.where(use_solid, solid, mlp_rgb)  # [..., 3]
