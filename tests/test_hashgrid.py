"""Tests of vsdjax.hashgrid against a slow reference after tiny-cuda-nn."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax.representations.nerf import hashgrid

# Level 0: resolution 5, dense, 125 cells in 128 rows (the wrap-around of the
# corner above the top cell matters); level 1: scale 6.5, resolution 8, dense,
# exactly T / 2 rows; levels 2 and 3: hashed.
SPEC = hashgrid.GridSpec(
  n_levels=4,
  n_features=2,
  log2_table_size=10,
  base_resolution=5,
  per_level_scale=1.5,
  init_scale=1.0,
)
PRIMES = (1, 2654435761, 805459861)


def reference_encode(tables, x, spec):
  """tiny-cuda-nn's grid encoding, one point, level and corner at a time.

  Args:
    tables: [L, T, F] numpy.
    x: [N, 3] numpy.
    spec: GridSpec.

  Returns:
    [N, L * F] float64.
  """
  n_levels, t, n_feat = tables.shape
  out = np.zeros((len(x), n_levels * n_feat))
  for n, point in enumerate(np.asarray(x, np.float64)):
    point = np.clip(point, 0.0, 1.0)
    for l in range(n_levels):
      scale = spec.base_resolution * spec.per_level_scale**l - 1.0
      res = math.ceil(scale) + 1
      hashmap_size = min(t, -(-(res**3) // 8) * 8)
      pos = [p * scale + 0.5 for p in point]
      cell = [math.floor(p) for p in pos]
      frac = [p - c for p, c in zip(pos, cell)]
      for offset in itertools.product((0, 1), repeat=3):
        corner = [c + o for c, o in zip(cell, offset)]
        # tiny-cuda-nn grid_index(): row-major while the stride fits.
        stride, index = 1, 0
        for d in range(3):
          if stride > hashmap_size:
            break
          index += corner[d] * stride
          stride *= res
        if hashmap_size < stride:
          index = 0
          for d in range(3):
            index ^= (corner[d] * PRIMES[d]) & 0xFFFFFFFF
        index = (index & 0xFFFFFFFF) % hashmap_size
        weight = 1.0
        for d in range(3):
          weight *= frac[d] if offset[d] else 1.0 - frac[d]
        out[n, l * n_feat : (l + 1) * n_feat] += weight * tables[l, index]
  return out


def test_levels_cover_dense_and_hashed():
  lv = hashgrid.levels(SPEC)
  np.testing.assert_array_equal(lv.resolution, [5, 8, 12, 17])
  np.testing.assert_array_equal(lv.dense, [True, True, False, False])
  np.testing.assert_array_equal(lv.size, [128, 512, 1024, 1024])
  default = hashgrid.levels(hashgrid.GridSpec())
  assert default.resolution[0] == 16 and default.resolution[-1] == 4096
  assert default.dense.sum() == 5  # 16^3 .. 71^3 <= 2^19 < 102^3.


@pytest.fixture(scope="module")
def tables():
  return hashgrid.init(jax.random.PRNGKey(0), SPEC)["tables"]


def test_init(tables):
  assert tables.shape == (4, 1024, 2) and tables.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(tables))) <= 1.0
  assert float(jnp.std(tables)) > 0.5  # uniform in [-1, 1]: std 0.577.


def _border_points(rng, spec):
  """Points with one coordinate exactly on a cell face of some level."""
  points = []
  for l, scale in enumerate(hashgrid.levels(spec).scale):
    for k in range(1, int(scale + 0.5) + 1):
      p = rng.uniform(0.0, 1.0, 3)
      p[(k + l) % 3] = (k - 0.5) / scale  # x * scale + 0.5 = k.
      points.append(p)
  return np.array(points)


def _test_points():
  rng = np.random.default_rng(0)
  corners = np.array(list(itertools.product((0.0, 1.0), repeat=3)))
  faces = rng.uniform(0.0, 1.0, (12, 3))
  faces[np.arange(12), np.arange(12) % 3] = np.arange(12) % 2  # 0 or 1.
  return np.concatenate([rng.uniform(0.0, 1.0, (64, 3)), corners, faces, _border_points(rng, SPEC)])


def _encode(t, x):
  return hashgrid.encode({"tables": t}, x, SPEC)


# Eager JAX compiles every primitive separately; jit compiles each test's
# computation once.
encode = jax.jit(_encode)


def test_encode_matches_reference_float32(tables):
  x = _test_points().astype(np.float32)
  got = encode(tables, x)
  want = reference_encode(np.asarray(tables, np.float64), x, SPEC)
  assert got.shape == (len(x), 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_encode_matches_reference_float64(tables):
  x = _test_points()
  t64 = np.asarray(tables, np.float64)
  with jax.enable_x64(True):
    got = encode(jnp.asarray(t64), jnp.asarray(x))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, reference_encode(t64, x, SPEC), atol=1e-12, rtol=0)


def test_outside_points_are_clamped_and_batch_shape(tables):
  rng = np.random.default_rng(1)
  x = rng.uniform(-0.5, 1.5, (2, 5, 3)).astype(np.float32)
  got = encode(tables, x)
  assert got.shape == (2, 5, 8)
  want = reference_encode(np.asarray(tables, np.float64), np.clip(x.reshape(-1, 3), 0.0, 1.0), SPEC)
  np.testing.assert_allclose(got.reshape(-1, 8), want, atol=5e-5, rtol=0)


def test_corners_rows_within_levels_and_weights_sum_to_one():
  x = _test_points().astype(np.float32)
  row, weights = jax.jit(hashgrid.corners, static_argnums=1)(x, SPEC)
  assert row.shape == weights.shape == (8, 4, len(x)) and row.dtype == jnp.int32
  size = hashgrid.levels(SPEC).size[None, :, None]
  assert bool(jnp.all(row >= 0)) and bool(jnp.all(row < size))
  np.testing.assert_allclose(jnp.sum(weights, axis=0), 1.0, atol=1e-6)
  assert bool(jnp.all(weights >= 0))


def _away_from_faces(x, spec, margin):
  """Mask [N] of points at least `margin` (grid units) from every cell face."""
  pos = x[:, None, :] * hashgrid.levels(spec).scale[None, :, None] + 0.5
  dist = np.abs(pos - np.round(pos))  # [N, L, 3]
  return np.all(dist > margin, axis=(1, 2))


def test_gradients_match_finite_differences(tables):
  rng = np.random.default_rng(2)
  x = rng.uniform(0.02, 0.98, (64, 3))
  x = x[_away_from_faces(x, SPEC, 1e-3)]
  cot = rng.normal(size=(len(x), 8))
  t64 = np.asarray(tables, np.float64)
  with jax.enable_x64(True):
    loss = jax.jit(lambda t, x: jnp.sum(_encode(t, x) * cot))

    g_t, g_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(t64), jnp.asarray(x))
    g_t, g_x = np.asarray(g_t), np.asarray(g_x)
    # Table entries: the 10 largest gradients and 10 random ones.
    flat = np.argsort(-np.abs(g_t).ravel())[:10]
    flat = np.concatenate([flat, rng.choice(t64.size, 10, replace=False)])
    h = 1e-3  # The loss is linear in the tables: differences are exact.
    for i in flat:
      idx = np.unravel_index(i, t64.shape)
      tp, tm = t64.copy(), t64.copy()
      tp[idx] += h
      tm[idx] -= h
      fd = (loss(jnp.asarray(tp), x) - loss(jnp.asarray(tm), x)) / (2 * h)
      np.testing.assert_allclose(g_t[idx], fd, atol=1e-9, rtol=1e-7)
    # Positions: each output depends on its own point only, so one central
    # difference per axis covers all points.
    h = 1e-7
    per_point = lambda x: np.sum(np.asarray(encode(t64, x)) * cot, axis=-1)
    for d in range(3):
      e = np.zeros(3)
      e[d] = h
      fd = (per_point(x + e) - per_point(x - e)) / (2 * h)
      np.testing.assert_allclose(g_x[:, d], fd, atol=1e-5, rtol=1e-6)
  assert np.abs(g_x).max() > 1.0  # The position gradient is exercised.


def test_position_gradient_is_zero_outside(tables):
  x = jnp.array([[-0.2, 0.5, 0.5], [0.5, 1.3, 0.5]])
  g = jax.jit(jax.grad(lambda x: jnp.sum(encode(tables, x))))(x)
  assert g[0, 0] == 0.0 and g[1, 1] == 0.0
  assert bool(jnp.all(jnp.isfinite(g)))


def test_vmap_over_tables(tables):
  x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (3, 7, 3)), jnp.float32)
  stacked = jnp.stack([tables, -2.0 * tables, tables + 1.0])
  got = jax.jit(jax.vmap(_encode))(stacked, x)
  for i in range(3):
    np.testing.assert_allclose(got[i], encode(stacked[i], x[i]), atol=1e-6)


def test_grid_spec_errors():
  for kwargs, name in [
    ({"n_levels": 0}, "n_levels"),
    ({"n_features": 1.5}, "n_features"),
    ({"log2_table_size": 40}, "log2_table_size"),
    ({"base_resolution": 1}, "base_resolution"),
    ({"per_level_scale": 0.9}, "per_level_scale"),
    ({"per_level_scale": float("nan")}, "per_level_scale"),
    ({"init_scale": -1.0}, "init_scale"),
  ]:
    with pytest.raises(ValueError, match=name):
      hashgrid.GridSpec(**kwargs)


@pytest.mark.parametrize(
  "backend, version, flags, warns",
  [
    ("gpu", "0.10.2", "", True),
    ("gpu", "0.11.0.dev20260101", "--xla_gpu_autotune_level=0", True),
    ("gpu", "0.10.2", f"--xla_gpu_autotune_level=0 {hashgrid.FTZ_ATOMICS_FLAG}", False),
    ("gpu", "0.10.1", "", False),
    ("gpu", "0.11.2", "", False),
    ("cpu", "0.10.2", "", False),
    ("tpu", "0.11.0", "", False),
  ],
)
def test_slow_gpu_scatter_warning_names_the_fix(backend, version, flags, warns):
  message = hashgrid.slow_scatter_warning(backend, version, flags)
  assert (message is not None) == warns
  if warns:
    assert version in message and "38806" in message and hashgrid.FTZ_ATOMICS_FLAG in message
