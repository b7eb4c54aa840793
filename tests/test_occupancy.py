"""Empty-space skipping: the occupancy grid, sample placement and the render with it.

References are written independently here: numpy loops over cells for the
grid's update and dilation, dense marching along each ray for its occupied
length, and a render with many stratified samples for the image.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from vsdjax.representations.nerf import occupancy, render
from vsdjax.training import models, train_step

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
BOUND = 1.0


def _ball_density(x, radius=0.35, value=40.0):
  """Density `value` inside a ball at (0.1, 0, 0), 0 outside: x [N, 3] -> [N]."""
  r = jnp.linalg.norm(x - jnp.array([0.1, 0.0, 0.0]), axis=-1)
  return jnp.where(r < radius, value, 0.0)


def _rays(n=24, seed=0):
  rng = np.random.default_rng(seed)
  eye = rng.normal(size=(n, 3))
  eye = 2.5 * eye / np.linalg.norm(eye, axis=-1, keepdims=True)
  d = rng.uniform(-0.5, 0.5, size=(n, 3)) - eye
  return eye.astype(np.float32), (d / np.linalg.norm(d, axis=-1, keepdims=True)).astype(np.float32)


def test_update_is_the_moving_maximum_of_cell_opacity():
  g, decay = 8, 0.9
  h = 2 * BOUND / g
  # Piecewise constant per cell, so the point drawn inside each cell does not matter.
  cell_density = np.random.default_rng(1).uniform(0.0, 2.0, (g, g, g)).astype(np.float32)

  def density_fn(x):
    i = jnp.clip(jnp.floor((x + BOUND) / h), 0, g - 1).astype(jnp.int32)
    return jnp.asarray(cell_density)[i[:, 0], i[:, 1], i[:, 2]]

  ema = np.random.default_rng(2).uniform(0.0, 1.0, (g, g, g)).astype(np.float32)
  out = np.asarray(occupancy.update(jnp.asarray(ema), density_fn, BOUND, decay, jax.random.key(0)))
  expected = np.empty_like(ema)
  for idx in np.ndindex(g, g, g):
    expected[idx] = max(decay * ema[idx], 1.0 - np.exp(-cell_density[idx] * h))
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_occupied_thresholds_and_dilates_by_one_cell():
  g = 6
  ema = np.zeros((g, g, g), np.float32)
  ema[2, 3, 1] = 0.5
  ema[5, 5, 5] = 0.02
  ema[0, 0, 0] = 0.005  # below the threshold and above the mean: mean decides
  occ = np.asarray(occupancy.occupied(jnp.asarray(ema), 0.01))
  thr = min(0.01, ema.mean())
  expected = np.zeros_like(occ)
  for idx in np.ndindex(g, g, g):
    lo = [max(i - 1, 0) for i in idx]
    hi = [min(i + 2, g) for i in idx]
    expected[idx] = (ema[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > thr).any()
  np.testing.assert_array_equal(occ, expected)
  assert not np.asarray(occupancy.occupied(jnp.zeros((g, g, g)), 0.01)).any()


def test_samples_spread_evenly_over_the_occupied_length():
  g, s = 16, 32
  occ = np.asarray(
    occupancy.occupied(
      occupancy.update(occupancy.init(g), _ball_density, BOUND, 0.95, jax.random.key(3)), 0.01
    )
  )
  o, d = _rays()
  near, far, hit = render.ray_aabb(jnp.asarray(o), jnp.asarray(d), BOUND, 0.05)
  t, length = occupancy.sample_t(
    jnp.asarray(occ), jnp.asarray(o), jnp.asarray(d), near, far, BOUND, s, 4 * g
  )
  t, length, near, far = (np.asarray(v) for v in (t, length, near, far))

  def occupied_at(x):
    i = np.clip(np.floor((x + BOUND) * g / (2 * BOUND)), 0, g - 1).astype(int)
    return occ[i[..., 0], i[..., 1], i[..., 2]]

  n_fine = 20_000
  assert length.max() > 0 and length.min() == 0  # some rays see the ball, some do not
  for r in range(len(o)):
    # Occupied length by marching finely (the candidate bins are 4 per cell: the same up to a bin).
    ts = near[r] + (np.arange(n_fine) + 0.5) * (far[r] - near[r]) / n_fine
    fine = occupied_at(o[r] + ts[:, None] * d[r]).mean() * (far[r] - near[r])
    assert abs(length[r] - fine) <= 2 * (far[r] - near[r]) / (4 * g) + 1e-5
    if length[r] == 0:
      continue
    assert np.all(np.diff(t[r]) > 0)
    # Each sample lies in a candidate bin whose centre is occupied (within half a bin of it).
    half = 0.5 * (far[r] - near[r]) / (4 * g)
    near_occupied = [occupied_at(o[r] + (t[r] + e)[:, None] * d[r]) for e in (-half, 0.0, half)]
    assert np.any(near_occupied, axis=0).all()
    # Between consecutive samples lies L / S of occupied length.
    between = [
      occupied_at(o[r] + np.linspace(a, b, 2001)[:, None] * d[r]).mean() * (b - a)
      for a, b in zip(t[r][:-1], t[r][1:])
    ]
    np.testing.assert_allclose(between, length[r] / s, atol=2 * (far[r] - near[r]) / (4 * g))


def test_all_occupied_is_the_stratified_render():
  spec = render.RenderSpec(n_samples=16, chunk=8, bound=BOUND)
  o, d = _rays()
  bg = np.full_like(o, 0.3)
  point_fn = lambda x, v: {"density": _ball_density(x), "rgb": 0.5 + 0.4 * jnp.tanh(x)}  # noqa: E731
  full = jnp.ones((8, 8, 8), bool)
  for key in (None, jax.random.key(0)):
    a = _jit(lambda: render.render(point_fn, o, d, bg, spec, key))()
    b = _jit(lambda: render.render(point_fn, o, d, bg, spec, key, full))()
    np.testing.assert_allclose(b["t_vals"], a["t_vals"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["rgb"], a["rgb"], atol=1e-5)


def test_skipping_renders_closer_to_the_dense_reference_with_the_same_budget():
  """With 16 samples per ray, spending them where the ball is beats spreading them."""
  o, d = _rays(64, seed=4)
  bg = np.full_like(o, 1.0)
  point_fn = lambda x, v: {"density": _ball_density(x), "rgb": 0.5 + 0.4 * jnp.tanh(3 * x)}  # noqa: E731
  occ = occupancy.occupied(
    occupancy.update(occupancy.init(32), _ball_density, BOUND, 0.95, jax.random.key(5)), 0.01
  )
  dense = render.render(point_fn, o, d, bg, render.RenderSpec(n_samples=4096, chunk=512))
  spec = render.RenderSpec(n_samples=16, chunk=16)
  plain = render.render(point_fn, o, d, bg, spec)
  skip = render.render(point_fn, o, d, bg, spec, None, occ)
  err = lambda out: float(np.sqrt(np.mean(np.square(out["rgb"] - dense["rgb"]))))  # noqa: E731
  assert err(skip) < 0.5 * err(plain)
  # Rays that miss every occupied cell show the background only.
  empty = np.asarray(jnp.sum(skip["weights"], -1)) == 0
  assert empty.any()
  np.testing.assert_allclose(np.asarray(skip["rgb"])[empty], 1.0)


def test_gradients_of_the_kept_samples_are_the_plain_renderers():
  """At fixed sample positions skipping changes nothing but where the samples are."""
  o, d = _rays(8)
  bg = np.zeros_like(o)
  occ = jnp.ones((4, 4, 4), bool)
  spec = render.RenderSpec(n_samples=8, chunk=8)

  def loss(scale, occupied):
    fn = lambda x, v: {"density": scale * _ball_density(x, 0.6, 5.0), "rgb": jnp.tanh(x) ** 2}  # noqa: E731
    return jnp.sum(render.render(fn, o, d, bg, spec, None, occupied)["rgb"])

  np.testing.assert_allclose(
    jax.grad(loss)(1.3, occ), jax.grad(lambda s: loss(s, None))(1.3), rtol=1e-5
  )


def test_train_step_updates_each_particles_grid_every_k_steps():
  """(Checkpointed and resumed bit-exact with the rest of the state: test_train.py's resume test
  runs with the grid on.)"""
  c = tiny_config(**{"render.occupancy_grid": 8, "render.occupancy_every": 2})
  m, frozen = models.build(c, jax.random.key(0))
  state = train_step.init_state(c, m, frozen, jax.random.key(1))
  assert state["aux"]["occupancy"].shape == (2, 8, 8, 8)
  assert not np.asarray(state["aux"]["occupancy"]).any()  # empty until the update at step 0
  step = train_step.make_train_step(c, m, frozen, 8)
  grids = []
  for _ in range(3):
    state, metrics = step(state, jax.random.key(2))
    grids.append(np.asarray(state["aux"]["occupancy"]))
  assert grids[0].max() > 0 and 0 < float(metrics["occupied_fraction"]) <= 1
  assert not np.array_equal(grids[0][0], grids[0][1])  # one grid per particle
  np.testing.assert_array_equal(grids[1], grids[0])  # step 1: no update
  assert not np.array_equal(grids[2], grids[1])  # step 2: updated
  # Without the grid the state keeps its former layout (older checkpoints restore).
  plain = tiny_config(**{"render.occupancy_grid": 0})
  m, frozen = models.build(plain, jax.random.key(0))
  assert "aux" not in train_step.init_state(plain, m, frozen, jax.random.key(1))
