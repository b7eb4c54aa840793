"""Tests for vsdjax.render against slow references written here.

The field is an analytic gaussian blob with position-dependent colour and
normals. The references evaluate all samples at once and composite with
cumsum (numpy float64 for values, jnp for gradients), independently of the
renderer's chunked lax.scan.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import cameras
from vsdjax.representations.nerf import render

SPEC = render.RenderSpec(n_samples=32, chunk=8, bound=1.0, near_min=0.05)

# The tests compile a dozen small programs; XLA's backend optimisations would
# take most of their run time and do not change the values compared.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _params():
  return {
    "center": jnp.array([0.1, -0.05, 0.05]),
    "log_width": jnp.array(math.log(0.35)),
    "peak": jnp.array(25.0),
    "w": jnp.array([[1.5, -0.5, 0.2], [0.3, 1.0, -0.8], [-0.4, 0.6, 1.2]]),
    "b": jnp.array([0.1, -0.2, 0.3]),
  }


def _blob(params, x, xp=jnp):
  """Density [N], rgb [N, 3], outward normal [N, 3] of the blob at x [N, 3]."""
  sigmoid = jax.nn.sigmoid if xp is jnp else lambda v: 1.0 / (1.0 + np.exp(-v))
  rel = x - params["center"]  # [N, 3]
  r2 = xp.sum(rel * rel, axis=-1)  # [N]
  density = params["peak"] * xp.exp(-0.5 * r2 / xp.exp(2 * params["log_width"]))
  rgb = sigmoid(x @ params["w"] + params["b"])  # [N, 3]
  normal = rel / xp.sqrt(r2 + 1e-6)[:, None]  # [N, 3]
  return density, rgb, normal


def _point_fn(params):
  def point_fn(x, d):
    del d  # The blob's colour does not depend on the view.
    density, rgb, normal = _blob(params, x)
    return {"density": density, "rgb": rgb, "normal": normal}

  return point_fn


def _rays():
  """[R, 3] origins / directions: hits from all sides, misses, edge cases."""
  rng = np.random.default_rng(0)
  eye = rng.normal(size=(10, 3))
  eye = 2.5 * eye / np.linalg.norm(eye, axis=-1, keepdims=True)
  target = rng.uniform(-0.6, 0.6, size=(10, 3))
  d = target - eye
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  extra_o = np.array(
    [
      [-3.0, 0.2, 0.3],  # axis-aligned (two zero components), hits.
      [0.0, 0.0, 0.0],  # starts inside the cube.
      [-3.0, 2.0, 0.0],  # parallel to x outside the y-slab: misses.
      [3.0, 0.0, 0.0],  # points away from the cube: misses.
      [2.0, 2.0, 2.0],  # passes beside the cube: misses.
      [0.0, -4.0, 0.1],  # non-unit direction, hits.
    ]
  )
  extra_d = np.array(
    [
      [1.0, 0.0, 0.0],
      [0.0, 0.6, 0.8],
      [1.0, 0.0, 0.0],
      [1.0, 0.0, 0.0],
      [1.0, -1.0, 0.0] / np.sqrt(2.0),
      [0.0, 2.0, 0.5],
    ]
  )
  return (
    np.concatenate([eye, extra_o]).astype(np.float32),
    np.concatenate([d, extra_d]).astype(np.float32),
  )


MISSES = [12, 13, 14]  # Indices of the rays that miss the cube.


def _slab_reference(o, d, bound, near_min):
  """Per-ray entry/exit by clipping the parameter interval axis by axis.

  Returns near [R], far [R], hit [R]; near = far = near_min where it misses.
  """
  near, far = [], []
  for oi, di in zip(o.astype(np.float64), d.astype(np.float64)):
    lo, hi = -np.inf, np.inf
    for k in range(3):
      if di[k] == 0.0:
        if abs(oi[k]) > bound:
          lo, hi = np.inf, -np.inf
        continue
      a, b = (-bound - oi[k]) / di[k], (bound - oi[k]) / di[k]
      lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    lo = max(lo, near_min)
    near.append(lo)
    far.append(hi)
  near, far = np.array(near), np.array(far)
  hit = far > near
  return (np.where(hit, near, near_min), np.where(hit, far, near_min), hit)


def _numpy_reference(params, o, d, t, background, bound, near, far, hit):
  """Renders rays at the sample parameters t [R, S] in float64 with cumsum."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  o, d, t = (np.asarray(v, np.float64) for v in (o, d, t))
  n_rays, n_samples = t.shape
  x = np.clip(o[:, None] + t[..., None] * d[:, None], -bound, bound)
  density, rgb, normal = _blob(p, x.reshape(-1, 3), xp=np)
  density = density.reshape(n_rays, n_samples)
  rgb = rgb.reshape(n_rays, n_samples, 3)
  normal = normal.reshape(n_rays, n_samples, 3)
  length = np.linalg.norm(d, axis=-1)
  delta = np.where(hit, (far - near) / n_samples, 0.0) * length  # [R]
  tau = density * delta[:, None]
  trans = np.exp(-(np.cumsum(tau, axis=-1) - tau))  # Shifted: T_0 = 1.
  w = (1.0 - np.exp(-tau)) * trans
  opacity = w.sum(-1)
  unit = d / length[:, None]
  facing = np.maximum(np.einsum("rsk,rk->rs", normal, unit), 0.0)
  return {
    "weights": w,
    "opacity": opacity,
    "rgb": (w[..., None] * rgb).sum(1) + (1 - opacity)[:, None] * background,
    "depth": (w * t).sum(-1),
    "normal": (w[..., None] * normal).sum(1),
    "orientation": (w * facing**2).sum(-1),
  }


@pytest.fixture(scope="module")
def scene():
  """Rays, background and outputs at bin centres and jittered (keys 3, 4)."""
  o, d = _rays()
  background = np.random.default_rng(1).uniform(size=o.shape).astype(np.float32)

  @_jit
  def render_all(params, keys):
    centre = render.render(_point_fn(params), o, d, background, SPEC)
    jittered = [render.render(_point_fn(params), o, d, background, SPEC, k) for k in keys]
    return centre, jittered

  keys = [jax.random.key(3), jax.random.key(3), jax.random.key(4)]
  centre, jittered = jax.tree.map(np.asarray, render_all(_params(), keys))
  return o, d, background, centre, jittered


def test_matches_numpy_reference(scene):
  o, d, background, out, _ = scene
  params = _params()
  near, far, hit = _slab_reference(o, d, SPEC.bound, SPEC.near_min)
  assert list(np.flatnonzero(~hit)) == MISSES
  got = render.ray_aabb(o, d, SPEC.bound, SPEC.near_min)
  for g, w in zip(got, (near, far, hit)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # Bin centres of S equal bins in [near, far].
  want_t = near[:, None] + (np.arange(32) + 0.5) * (far - near)[:, None] / 32
  np.testing.assert_allclose(out["t_vals"], want_t, rtol=1e-5, atol=1e-5)
  ref = _numpy_reference(params, o, d, out["t_vals"], background, SPEC.bound, near, far, hit)
  assert out["weights"].shape == (16, 32) and out["rgb"].shape == (16, 3)
  for k in ("weights", "opacity", "rgb", "depth", "normal", "orientation"):
    np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The scene is far from trivial: some rays nearly opaque, some transparent.
  assert ref["opacity"].max() > 0.99 and np.sort(ref["opacity"])[3] < 0.5


def test_rays_that_miss_show_background(scene):
  _, _, background, out, _ = scene
  np.testing.assert_array_equal(out["weights"][MISSES], 0.0)
  np.testing.assert_array_equal(out["opacity"][MISSES], 0.0)
  np.testing.assert_array_equal(out["depth"][MISSES], 0.0)
  np.testing.assert_array_equal(out["rgb"][MISSES], background[MISSES])
  assert np.all(out["opacity"][np.setdiff1d(np.arange(16), MISSES)] > 1e-3)


def test_jittered_samples(scene):
  o, d, background, _, (out, again, other) = scene
  near, far, hit = _slab_reference(o, d, SPEC.bound, SPEC.near_min)
  t = np.asarray(out["t_vals"], np.float64)[hit]
  width = ((far - near) / 32)[hit][:, None]
  offset = (t - near[hit][:, None]) / width - np.arange(32)  # In [0, 1).
  assert np.all(offset > -1e-3) and np.all(offset < 1 + 1e-3)
  assert offset.std() > 0.2  # Spread over the bins, not at their centres.
  ref = _numpy_reference(_params(), o, d, out["t_vals"], background, SPEC.bound, near, far, hit)
  for k in ("weights", "rgb", "depth"):
    np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
  np.testing.assert_array_equal(again["t_vals"], out["t_vals"])
  assert not np.allclose(other["t_vals"][hit], out["t_vals"][hit])


def _jnp_reference_loss(params, o, d, t, background, hit, near, far, probe):
  """A scalar of every output, rendered with jnp.cumsum over all samples."""
  n_rays, n_samples = t.shape
  x = jnp.clip(o[:, None] + t[..., None] * d[:, None], -1.0, 1.0)
  density, rgb, normal = _blob(params, x.reshape(-1, 3))
  density = density.reshape(n_rays, n_samples)
  rgb = rgb.reshape(n_rays, n_samples, 3)
  normal = normal.reshape(n_rays, n_samples, 3)
  length = jnp.linalg.norm(d, axis=-1)
  delta = jnp.where(hit, (far - near) / n_samples, 0.0) * length
  tau = density * delta[:, None]
  trans = jnp.exp(-(jnp.cumsum(tau, axis=-1) - tau))
  w = (1.0 - jnp.exp(-tau)) * trans
  opacity = w.sum(-1)
  facing = jnp.maximum(jnp.einsum("rsk,rk->rs", normal, d / length[:, None]), 0.0)
  out = {
    "rgb": (w[..., None] * rgb).sum(1) + (1 - opacity)[:, None] * background,
    "opacity": opacity,
    "depth": (w * t).sum(-1),
    "normal": (w[..., None] * normal).sum(1),
    "orientation": (jax.lax.stop_gradient(w) * facing**2).sum(-1),
    "weights": w,
  }
  return _probe_loss(out, probe)


def _probe_loss(out, probe):
  """A random linear functional of the outputs plus the regularisers."""
  return (
    jnp.sum(out["rgb"] * probe["rgb"])
    + jnp.sum(out["opacity"] * probe["opacity"])
    + 0.1 * jnp.sum(out["depth"] * probe["depth"])
    + jnp.sum(out["normal"] * probe["normal"])
    + jnp.sum(out["weights"] * probe["weights"])
    + render.orientation(out)
    + render.entropy(out)
    + render.opaque(out)
    + render.opacity_sparsity(out)
  )


def _probe(n_rays, n_samples):
  rng = np.random.default_rng(2)
  shapes = {
    "rgb": (n_rays, 3),
    "opacity": (n_rays,),
    "depth": (n_rays,),
    "normal": (n_rays, 3),
    "weights": (n_rays, n_samples),
  }
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def test_gradients_match_cumsum_reference_and_checkpointing(scene):
  o, d, background, _, _ = scene
  params = _params()
  probe = _probe(16, 32)
  near, far, hit = (jnp.asarray(v, jnp.float32) for v in _slab_reference(o, d, 1.0, 0.05))
  t = near[:, None] + (jnp.arange(32) + 0.5) * (far - near)[:, None] / 32

  def loss(p, spec):
    out = render.render(_point_fn(p), o, d, background, spec)
    return _probe_loss(out, probe)

  no_remat = render.RenderSpec(n_samples=32, chunk=8, checkpoint=False)

  @_jit
  def grads(p):
    return (
      jax.grad(loss)(p, SPEC),
      jax.grad(loss)(p, no_remat),
      jax.grad(_jnp_reference_loss)(p, o, d, t, background, hit, near, far, probe),
    )

  grad_scan, grad_plain, grad_ref = grads(params)
  for k in params:
    scale = float(jnp.max(jnp.abs(grad_ref[k])))
    assert scale > 1e-3, k  # Every parameter matters to the loss.
    np.testing.assert_allclose(grad_scan[k], grad_ref[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)
    np.testing.assert_allclose(grad_plain[k], grad_scan[k], rtol=1e-5, atol=1e-6 * scale, err_msg=k)


def test_chunk_size_does_not_change_result(scene):
  o, d, background, base, _ = scene

  @_jit
  def render_chunks(params):
    return [
      render.render(_point_fn(params), o, d, background, render.RenderSpec(n_samples=32, chunk=c))
      for c in (1, 32)
    ]

  for chunk, out in zip((1, 32), render_chunks(_params())):
    for k in base:
      np.testing.assert_allclose(
        out[k], base[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} chunk={chunk}"
      )


def test_uniform_slab_closed_form():
  sigma = 1.7
  bound = 0.8
  origins = np.array(
    [
      [-3.0, 0.1, -0.2],  # along x: length 2 * bound.
      [-2.0, -2.0, -2.0],  # main diagonal: 2 sqrt(3) bound.
      [0.0, 0.0, 0.0],  # from the centre along z.
      [1.0, 0.5, -0.1],
    ],
    np.float32,
  )  # clips a corner.
  unit = np.array(
    [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0] / np.sqrt(3.0), [0.0, 0.0, 1.0], [-0.6, 0.8, 0.0]], np.float32
  )
  # Entry parameters along the unit directions. The corner ray enters x = 0.8
  # at t = 1/3 (y = 0.767) and leaves through y = 0.8 at t = 0.375.
  entry = np.array([3.0 - bound, (2.0 - bound) * math.sqrt(3.0), 0.0, 1 / 3])
  exit_ = np.array([3.0 + bound, (2.0 + bound) * math.sqrt(3.0), bound, 0.375])

  def point_fn(x, d):
    del d
    return {"density": jnp.full(x.shape[:1], sigma), "rgb": jnp.ones_like(x)}

  spec = render.RenderSpec(n_samples=16, chunk=4, bound=bound, near_min=0.05)
  render_fn = _jit(lambda v: render.render(point_fn, origins, v, np.zeros((4, 3)), spec))
  for scale in (1.0, 2.0):
    out = render_fn(unit * scale)
    assert "normal" not in out and "orientation" not in out
    # Ray parameters are in multiples of |direction|, near_min included.
    near = np.maximum(entry / scale, spec.near_min)
    far = exit_ / scale
    np.testing.assert_allclose(out["t_vals"][:, 0], near + (far - near) / 32, rtol=1e-5)
    # Densities integrate over world length.
    length = (far - near) * scale
    want = 1.0 - np.exp(-sigma * length)
    np.testing.assert_allclose(out["opacity"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["rgb"], np.repeat(want[:, None], 3, 1), rtol=1e-5, atol=1e-6)


def test_render_image_and_ray_batching():
  cam = cameras.from_spherical(2.0, 20.0, 30.0, 50.0)
  background_fn = lambda v: 0.5 * (v + 1.0)
  spec = render.RenderSpec(n_samples=16, chunk=8)

  @_jit
  def images(params):
    point_fn = _point_fn(params)
    image = functools.partial(
      render.render_image, point_fn, cam.c2w, cam.fovy, 3, 5, background_fn, spec
    )
    o, d = cameras.rays(cam.c2w, cam.fovy, 3, 5)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    flat = render.render(point_fn, o, d, background_fn(d), spec)
    return (image(), flat, image(ray_batch=4), image(key=jax.random.key(0), ray_batch=8))

  image, flat, batched, jittered = images(_params())
  assert image["rgb"].shape == (3, 5, 3)
  assert image["weights"].shape == (3, 5, 16)
  for k in flat:
    want = flat[k].reshape(image[k].shape)
    np.testing.assert_allclose(image[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(batched[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(image["opacity"][1, 2]) > 0.9  # The blob is in the middle.
  assert jittered["rgb"].shape == (3, 5, 3)
  assert not np.allclose(jittered["t_vals"], image["t_vals"])


def test_vmap_over_fields(scene):
  o, d, background, centre, _ = scene
  p0 = _params()
  p1 = dict(p0, center=p0["center"] + 0.2, peak=jnp.array(5.0))
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
  both = _jit(jax.vmap(lambda p: render.render(_point_fn(p), o, d, background, SPEC)))(stacked)
  # Particle 0 equals the unbatched render; particle 1 differs from it.
  for k in centre:
    np.testing.assert_allclose(both[k][0], centre[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert not np.allclose(both["rgb"][1], centre["rgb"])
  p1_ref = _numpy_reference(
    p1,
    o,
    d,
    centre["t_vals"],
    background,
    SPEC.bound,
    *_slab_reference(o, d, SPEC.bound, SPEC.near_min),
  )
  np.testing.assert_allclose(both["rgb"][1], p1_ref["rgb"], rtol=2e-5, atol=2e-6)


def test_regularisers_match_formulas():
  rng = np.random.default_rng(5)
  opacity = np.concatenate([[0.0, 1.0, 1e-5], rng.uniform(size=5)])
  weights = np.concatenate([np.zeros((1, 4)), rng.uniform(size=(3, 4))])
  orient = rng.uniform(size=8)
  out = {
    "opacity": jnp.asarray(opacity, jnp.float32),
    "weights": jnp.asarray(weights, jnp.float32),
    "orientation": jnp.asarray(orient, jnp.float32),
  }
  regs = _jit(
    lambda o: [
      f(o) for f in (render.opacity_sparsity, render.opaque, render.entropy, render.orientation)
    ]
  )
  sparsity, opaque, entropy, orientation = regs(out)
  np.testing.assert_allclose(sparsity, np.mean(np.sqrt(opacity**2 + 0.01)), rtol=1e-6)
  oc = np.clip(opacity, 1e-3, 1 - 1e-3)
  np.testing.assert_allclose(
    opaque, np.mean(-oc * np.log(oc) - (1 - oc) * np.log(1 - oc)), rtol=1e-5
  )
  wc = np.clip(weights, 1e-5, 1 - 1e-5)
  np.testing.assert_allclose(
    entropy, np.mean(-wc * np.log2(wc) - (1 - wc) * np.log2(1 - wc)), rtol=1e-5
  )
  np.testing.assert_allclose(orientation, np.mean(orient), rtol=1e-6)
  # Binary entropy peaks at 1 bit for w = 1/2.
  half = dict(out, weights=jnp.full((4, 4), 0.5))
  np.testing.assert_allclose(regs(half)[2], 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="normal"):
    render.orientation({"opacity": jnp.ones(3)})


def test_validation():
  with pytest.raises(ValueError, match="chunk"):
    render.RenderSpec(n_samples=30, chunk=8)
  with pytest.raises(ValueError, match="n_samples"):
    render.RenderSpec(n_samples=0)
  with pytest.raises(ValueError, match="bound"):
    render.RenderSpec(bound=-1.0)
  with pytest.raises(ValueError, match="near_min"):
    render.RenderSpec(near_min=float("nan"))
