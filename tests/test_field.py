"""Tests of vsdjax.mlp, vsdjax.field and vsdjax.background."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import mlp
from vsdjax.representations.nerf import background, field, hashgrid

GRID = hashgrid.GridSpec(
  n_levels=4, n_features=2, log2_table_size=10, base_resolution=4, per_level_scale=1.5
)
SPEC = field.FieldSpec(grid=GRID, hidden=16)
N = 32  # Points per test batch (one compiled shape).

# Eager JAX compiles every primitive separately; whole functions under jit
# compile once per spec and shape, which keeps this file fast.
init = jax.jit(field.init, static_argnums=1)
density = jax.jit(field.density, static_argnums=2)
density_and_albedo = jax.jit(field.density_and_albedo, static_argnums=2)
normals = jax.jit(field.normals, static_argnums=2)


@pytest.fixture(scope="module")
def params():
  return init(jax.random.PRNGKey(0), SPEC)


def _points(seed, n, r_min, r_max):
  """n world points [n, 3] with r_min <= |x| <= r_max, float64 numpy."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(n, 3))
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  return d * rng.uniform(r_min, r_max, (n, 1))


def test_mlp_matches_numpy():
  p = jax.jit(mlp.init, static_argnums=1)(jax.random.PRNGKey(1), (5, 7, 4, 2))
  assert [p[f"layer_{i}"]["w"].shape for i in range(3)] == [(5, 7), (7, 4), (4, 2)]
  p = jax.tree.map(lambda a: a + 0.1, p)  # Non-zero biases.
  x = np.random.default_rng(0).normal(size=(3, 6, 5))
  h = x
  for i in range(3):
    h = h @ np.asarray(p[f"layer_{i}"]["w"]) + np.asarray(p[f"layer_{i}"]["b"])
    if i < 2:
      h = np.maximum(h, 0.0)
  np.testing.assert_allclose(jax.jit(mlp.apply)(p, x.astype(np.float32)), h, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="sizes"):
    mlp.init(jax.random.PRNGKey(0), [3])


def test_shapes_and_ranges(params):
  x = jnp.asarray(_points(0, N, 0.0, 1.2).reshape(2, N // 2, 3), jnp.float32)
  dens, albedo = density_and_albedo(params, x, SPEC)
  assert dens.shape == (2, N // 2) and albedo.shape == (2, N // 2, 3)
  assert bool(jnp.all(dens >= 0)) and bool(jnp.all((albedo >= 0) & (albedo <= 1)))
  np.testing.assert_allclose(density(params, x, SPEC), dens, rtol=1e-6)
  assert normals(params, x, SPEC).shape == (2, N // 2, 3)


@pytest.mark.parametrize("activation", ["trunc_exp", "softplus"])
def test_blob_density_at_init(params, activation):
  spec = dataclasses.replace(SPEC, density_activation=activation)
  x = _points(1, N, 0.0, 1.0)
  x[0], x[1] = [0.0, 0.0, 0.0], [0.9, 0.0, 0.0]
  dens = np.asarray(density(params, jnp.asarray(x, jnp.float32), spec))
  raw = 10.0 * (1.0 - np.linalg.norm(x, axis=-1) / 0.5)
  want = np.exp(raw) if activation == "trunc_exp" else np.log1p(np.exp(raw))
  # At init the grid (|features| <= 1e-4) barely moves the raw density.
  np.testing.assert_allclose(dens, want, rtol=1e-2)
  assert dens[0] > 9.0 and dens[1] < 1e-3  # Centre and outside the blob.


def test_gaussian_and_no_bias():
  x = np.array([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 1.0]])
  gauss = field.FieldSpec(grid=GRID, density_bias="gaussian", density_activation="softplus")
  np.testing.assert_allclose(
    field.density_bias(jnp.asarray(x), gauss),
    10.0 * np.exp(-0.5 * np.sum(x**2, -1) / 0.25),
    rtol=1e-6,
  )
  none = field.FieldSpec(grid=GRID, density_bias="none")
  np.testing.assert_array_equal(field.density_bias(jnp.asarray(x), none), np.zeros(3))


def test_trunc_exp_gradient_clamp():
  xs = jnp.array([-3.0, 0.0, 3.0, 14.5, 20.0, 50.0])
  np.testing.assert_allclose(field.trunc_exp(xs), np.exp(np.asarray(xs)), rtol=1e-6)
  g = jax.vmap(jax.grad(field.trunc_exp))(xs)
  np.testing.assert_allclose(g, np.exp(np.minimum(np.asarray(xs), 15.0)), rtol=1e-6)
  # Reverse over reverse (normals inside a loss): d/dx exp(min(x, 15)).
  gg = jax.vmap(jax.grad(jax.grad(field.trunc_exp)))(xs)
  np.testing.assert_allclose(
    gg, np.where(np.asarray(xs) <= 15.0, np.exp(np.asarray(xs)), 0.0), rtol=1e-6
  )
  assert np.isfinite(float(field.trunc_exp(1e4)))


def test_normals_match_finite_differences(params):
  spec = dataclasses.replace(SPEC, density_activation="softplus")
  # Large random tables so the grid shapes the density, not just the blob.
  rng = np.random.default_rng(3)
  p = dict(params)
  p["grid"] = {"tables": rng.uniform(-0.5, 0.5, params["grid"]["tables"].shape)}
  x = _points(3, 48, 0.1, 0.9)
  # Keep points whose difference stencil stays inside one cell per level.
  pos = ((x + 1.0) / 2.0)[:, None, :] * hashgrid.levels(spec.grid).scale[None, :, None] + 0.5
  x = x[np.all(np.abs(pos - np.round(pos)) > 1e-3, axis=(1, 2))]
  with jax.enable_x64(True):
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    n = np.asarray(normals(p, jnp.asarray(x), spec))
    h = 1e-6
    grad = np.zeros_like(x)
    for d in range(3):
      e = np.zeros(3)
      e[d] = h
      grad[:, d] = (
        np.asarray(density(p, jnp.asarray(x + e), spec))
        - np.asarray(density(p, jnp.asarray(x - e), spec))
      ) / (2 * h)
  want = -grad / np.linalg.norm(grad, axis=-1, keepdims=True)
  np.testing.assert_allclose(n, want, atol=1e-6)
  # The grid bends the normals away from the pure blob's radial ones.
  radial = x / np.linalg.norm(x, axis=-1, keepdims=True)
  assert np.max(np.abs(n - radial)) > 1e-2


def test_normals_of_pure_blob_are_radial(params):
  p = dict(params)
  p["grid"] = {"tables": jnp.zeros_like(params["grid"]["tables"])}
  x = _points(5, N, 0.05, 1.0)
  n = normals(p, jnp.asarray(x, jnp.float32), SPEC)
  np.testing.assert_allclose(n, x / np.linalg.norm(x, axis=-1, keepdims=True), atol=1e-5)
  # At the origin the blob has no gradient: the normal is zero, not NaN, and
  # so is the parameter gradient through it.
  origin = jnp.zeros((N, 3))
  np.testing.assert_array_equal(normals(p, origin, SPEC), 0.0)
  g = jax.jit(jax.grad(lambda q: jnp.sum(normals(q, origin, SPEC))))(p)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))


def test_shading_modes():
  rng = np.random.default_rng(6)
  albedo = rng.uniform(0, 1, (10, 3))
  normal = _points(7, 10, 1.0, 1.0)
  light = np.array([0.0, 0.0, 2.0])  # Not unit: shade normalises it.
  lam = np.maximum(normal[:, 2:3], 0.0)
  np.testing.assert_allclose(field.shade(albedo, None, None, "albedo"), albedo)
  np.testing.assert_allclose(
    field.shade(albedo, normal, light, "diffuse"), albedo * (0.1 + 0.9 * lam), rtol=1e-5
  )
  np.testing.assert_allclose(
    field.shade(albedo, normal, light, "textureless", ambient=0.3),
    np.repeat(0.3 + 0.7 * lam, 3, axis=-1),
    rtol=1e-5,
  )
  back = field.shade(albedo, -np.tile(light / 2, (10, 1)), light, "diffuse")
  np.testing.assert_allclose(back, 0.1 * albedo, rtol=1e-5)


def test_point_fn(params):
  x = jnp.asarray(_points(8, N, 0.0, 1.0), jnp.float32)
  d = jnp.ones_like(x)
  light = jnp.array([0.3, -0.2, 0.9])

  @jax.jit
  def run(p, x, d):
    return (
      field.point_fn(p, SPEC)(x, d),
      field.point_fn(p, SPEC, "diffuse", light)(x, d),
      field.point_fn(p, SPEC, with_normals=True)(x, d),
    )

  plain, diffuse, with_normals = run(params, x, d)
  assert set(plain) == {"density", "rgb"}
  assert set(diffuse) == {"density", "rgb", "normal"}
  dens, albedo = density_and_albedo(params, x, SPEC)
  normal = normals(params, x, SPEC)
  np.testing.assert_allclose(plain["rgb"], albedo, rtol=1e-6)
  np.testing.assert_allclose(diffuse["density"], dens, rtol=1e-5)
  np.testing.assert_allclose(diffuse["normal"], normal, atol=1e-5)
  np.testing.assert_allclose(
    diffuse["rgb"], field.shade(albedo, normal, light, "diffuse"), atol=1e-5
  )
  np.testing.assert_allclose(with_normals["normal"], normal, atol=1e-5)
  # Shading with normals is differentiable w.r.t. the parameters.
  g = jax.jit(
    jax.grad(lambda q: jnp.sum(field.point_fn(q, SPEC, "textureless", light)(x, d)["rgb"]))
  )(params)
  assert float(jnp.max(jnp.abs(g["grid"]["tables"]))) > 0.0
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))


def test_jit_vmap_over_particles():
  n = 3
  particles = jax.tree.map(
    lambda *a: jnp.stack(a), *[init(k, SPEC) for k in jax.random.split(jax.random.PRNGKey(9), n)]
  )
  assert particles["grid"]["tables"].shape == (n, 4, 1024, 2)
  x = jnp.asarray(_points(10, n * N, 0.0, 1.0).reshape(n, N, 3), jnp.float32)
  light = jnp.array([0.0, 0.6, 0.8])
  step = jax.jit(jax.vmap(lambda p, x: field.point_fn(p, SPEC, "diffuse", light)(x, x)))
  out = step(particles, x)
  assert out["rgb"].shape == (n, N, 3) and out["density"].shape == (n, N)
  for i in range(n):
    p_i = jax.tree.map(lambda a: a[i], particles)
    np.testing.assert_allclose(out["density"][i], density(p_i, x[i], SPEC), rtol=1e-5)
    np.testing.assert_allclose(out["normal"][i], normals(p_i, x[i], SPEC), atol=1e-5)


def test_sample_light():
  sample_light = jax.jit(field.sample_light, static_argnames=("n", "perturb"))
  key = jax.random.PRNGKey(11)
  l = np.asarray(sample_light(key, 2000))
  np.testing.assert_allclose(np.linalg.norm(l, axis=-1), 1.0, atol=1e-5)
  assert l[:, 2].mean() > 0.15  # Mostly from above (mean ~0.24).
  assert np.asarray(sample_light(key, 2000, perturb=0.0))[:, 2].min() >= 0.0
  cams = np.array([[2.0, 0.0, 1.0]] * 1000 + [[0.0, -1.0, 0.0]] * 1000)
  unit = cams / np.linalg.norm(cams, axis=-1, keepdims=True)
  np.testing.assert_allclose(sample_light(key, 2000, cams, perturb=0.0), unit, rtol=1e-6)
  near = np.asarray(sample_light(key, 2000, cams))
  assert np.sum(near * unit, axis=-1).mean() > 0.6  # Around the camera.


@pytest.mark.slow
def test_albedo_init_std_gives_each_field_its_colour(params):
  keys = jax.random.split(jax.random.PRNGKey(1), 64)
  spec = dataclasses.replace(SPEC, albedo_init_std=1.0)
  x = jnp.asarray(_points(5, N, 0.0, 0.4), jnp.float32)  # Inside the blob.
  grey = jax.vmap(lambda k: density_and_albedo(init(k, SPEC), x, SPEC)[1])(keys)
  coloured = jax.vmap(lambda k: density_and_albedo(init(k, spec), x, spec)[1])(keys)
  # Per field, the mean albedo over points: grey fields all near 0.5 (the
  # hash grid starts near 0), coloured fields spread like sigmoid(N(0, 1)).
  grey_mean = np.asarray(grey).mean(axis=1)  # [64, 3]
  colour_mean = np.asarray(coloured).mean(axis=1)
  assert np.abs(grey_mean - 0.5).max() < 0.05
  assert 0.15 < colour_mean.std(axis=0).min() < 0.3  # sigmoid(N(0,1)): std 0.21
  # Only the albedo head's output bias differs; the rest is the same draw.
  a, b = init(keys[0], SPEC), init(keys[0], spec)
  diff = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), a, b)
  changed = [path for path, d in jax.tree_util.tree_flatten_with_path(diff)[0] if d]
  assert [jax.tree_util.keystr(p) for p in changed] == ["['albedo_mlp']['layer_1']['b']"]


def test_field_spec_errors():
  for kwargs, name in [
    ({"bound": 0.0}, "bound"),
    ({"hidden": 0}, "hidden"),
    ({"n_hidden_layers": -1}, "n_hidden_layers"),
    ({"density_activation": "relu"}, "density_activation"),
    ({"density_bias": "ball"}, "density_bias"),
    ({"blob_radius": 0.0}, "blob_radius"),
    ({"blob_density": float("inf")}, "blob_density"),
    ({"albedo_init_std": -1.0}, "albedo_init_std"),
    ({"grid": {"n_levels": 4}}, "grid"),
  ]:
    with pytest.raises(ValueError, match=name):
      field.FieldSpec(**kwargs)


def _fibonacci_sphere(n):
  """[n, 3] nearly uniform unit vectors (an equal-area quadrature)."""
  i = np.arange(n) + 0.5
  z = 1.0 - 2.0 * i / n
  phi = np.pi * (1.0 + 5**0.5) * i
  r = np.sqrt(1.0 - z * z)
  return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def test_spherical_harmonics_are_orthonormal():
  d = _fibonacci_sphere(40_000)
  with jax.enable_x64(True):
    y = np.asarray(background.spherical_harmonics(jnp.asarray(d), 4))
  assert y.shape == (40_000, 16)
  gram = 4.0 * np.pi * (y.T @ y) / len(d)
  np.testing.assert_allclose(gram, np.eye(16), atol=1e-3)
  # Bands 0 and 1 in tiny-cuda-nn's order and signs.
  e = np.eye(3)
  with jax.enable_x64(True):
    y1 = np.asarray(background.spherical_harmonics(jnp.asarray(e), 2))
  c = 0.48860251190291987
  np.testing.assert_allclose(y1[:, 1:], [[0, 0, -c], [-c, 0, 0], [0, c, 0]], atol=1e-12)


def test_background_color():
  p = jax.jit(background.init, static_argnums=(1, 2))(jax.random.PRNGKey(12), 8, 3)
  assert p["mlp"]["layer_0"]["w"].shape == (9, 8)
  dirs = jnp.asarray(_points(13, 20, 0.5, 3.0).reshape(4, 5, 3), jnp.float32)
  color = jax.jit(background.color)
  rgb = color(p, dirs)
  assert rgb.shape == (4, 5, 3)
  assert bool(jnp.all((rgb >= 0) & (rgb <= 1)))
  # Only the direction matters, not the length.
  np.testing.assert_allclose(color(p, 7.0 * dirs), rgb, atol=1e-6)
  with pytest.raises(ValueError, match="degree"):
    background.init(jax.random.PRNGKey(0), degree=5)


def test_solid_or_mlp():
  rgb = jnp.asarray(np.random.default_rng(14).uniform(0, 1, (50, 3)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(15), 400)
  # One compilation: prob is traced.
  per_render = jax.jit(jax.vmap(background.solid_or_mlp, in_axes=(0, None, None)))
  never = per_render(keys, rgb, 0.0)
  np.testing.assert_array_equal(never, np.broadcast_to(rgb, never.shape))
  always = np.asarray(per_render(keys, rgb, 1.0))
  # One colour per render, different between renders, in [0, 1].
  np.testing.assert_array_equal(always, always[:, :1, :].repeat(50, axis=1))
  assert len(np.unique(always[:, 0, 0])) == 400
  assert np.all((always >= 0) & (always <= 1))
  half = np.asarray(per_render(keys, rgb, 0.5))
  replaced = np.any(half != np.asarray(rgb), axis=(1, 2))
  assert 0.4 < replaced.mean() < 0.6  # Binomial(400, 0.5): std 0.025.
