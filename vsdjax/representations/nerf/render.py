"""Volume rendering of radiance fields: stratified samples, scan compositing.

A field is any `point_fn(x [N, 3], d [N, 3]) -> dict` with
  'density': [N] volume density (>= 0, per world unit),
  'rgb':     [N, 3] colour,
  'normal':  [N, 3] world-space normal (optional),
where d are unit view directions (from the camera into the scene). Parameters
are closed over by point_fn, so jax.grad / jax.vmap of a function that calls
`render` differentiate / batch through the field's parameters.

Sampling. Rays are clipped to the cube [-bound, bound]^3 with the slab test;
near is at least `near_min`. The interval [near, far] of each ray is split into
S equal bins of width delta = (far - near) / S (in ray units, i.e. multiples of
|direction|). Sample i sits at the bin centre, or uniformly jittered inside its
bin when a PRNG key is given. Rays that miss the cube get delta = 0, hence zero
weights everywhere, and show the background.

Compositing (front to back), with tau_i = density_i * delta * |direction|:
  alpha_i = 1 - exp(-tau_i),  T_i = exp(-sum_{j<i} tau_j),  w_i = alpha_i T_i,
  rgb = sum_i w_i rgb_i + (1 - opacity) * background,  opacity = sum_i w_i,
  depth = sum_i w_i t_i  (expected ray parameter with the background at depth 0;
          divide by opacity for the depth of the visible surface),
  normal = sum_i w_i n_i (world space, not renormalised; zero where empty).
`jax.lax.scan` walks over chunks of `chunk` samples; the carry holds the optical
depth sum_{j<i} tau_j and the running sums, and each step evaluates point_fn on
[R * chunk] points. The step is wrapped in `jax.checkpoint`, so the backward
pass recomputes point_fn chunk by chunk instead of storing the field's
activations for all samples.

Empty-space skipping: given an occupancy grid (occupancy.py), the S samples
of a ray are spread over the occupied part of [near, far] instead (all with
the same width delta = L / S, L the occupied length; occupancy.sample_t), and
compositing is as above.

Regularisers are pure functions of the output dict, each a scalar averaged over
rays: `opacity_sparsity`, `opaque`, `orientation` (needs normals) and
`entropy` (averaged over the samples of the rays too).
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from vsdjax import cameras, checks
from vsdjax.representations.nerf import occupancy as occupancy_lib

PointFn = Callable[[jnp.ndarray, jnp.ndarray], Dict[str, jnp.ndarray]]

# Directions smaller than this per component are treated as this (with their
# sign) in the slab test, so 1 / d stays finite.
_TINY_DIRECTION = 1e-15
# The compositing sums over a chunk's samples in full float32: a TPU's default float32
# einsum is one bfloat16 pass (8 significant bits).
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """Static settings of the volume renderer.

  Attributes:
    n_samples: S, samples per ray.
    chunk: samples per lax.scan step; n_samples % chunk == 0.
    bound: rays are clipped to the cube [-bound, bound]^3.
    near_min: smallest ray parameter sampled, in ray units (skips points at
      the camera).
    checkpoint: rematerialise each scan step (jax.checkpoint) in the backward
      pass. Results and gradients are the same either way; memory is not.
  """

  n_samples: int = 64
  chunk: int = 16
  bound: float = 1.0
  near_min: float = 0.05
  checkpoint: bool = True

  def __post_init__(self):
    checks.check_fields(
      self,
      n_samples=checks.integer(1),
      chunk=checks.integer(1),
      bound=checks.POSITIVE,
      near_min=checks.NONNEGATIVE,
      checkpoint=checks.boolean,
    )
    if self.n_samples % self.chunk:
      raise ValueError(
        f"RenderSpec.n_samples ({self.n_samples}) must be a "
        f"multiple of RenderSpec.chunk ({self.chunk})"
      )


def ray_aabb(
  origins: jnp.ndarray, directions: jnp.ndarray, bound: float, near_min: float
) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Intersects rays with the cube [-bound, bound]^3 (slab test).

  Args:
    origins: [..., 3] ray origins.
    directions: [..., 3] ray directions (any non-zero length).
    bound: half edge of the cube.
    near_min: lower limit of near.

  Returns:
    near: [...] entry parameter, >= near_min (near_min where the ray misses).
    far: [...] exit parameter (equal to near where the ray misses).
    hit: [...] bool, whether [near, far] is a non-empty piece of the cube.
  """
  safe_d = jnp.where(
    jnp.abs(directions) < _TINY_DIRECTION, jnp.copysign(_TINY_DIRECTION, directions), directions
  )
  inv_d = 1.0 / safe_d  # [..., 3]
  t0 = (-bound - origins) * inv_d  # [..., 3]
  t1 = (bound - origins) * inv_d  # [..., 3]
  near = jnp.max(jnp.minimum(t0, t1), axis=-1)  # [...]
  far = jnp.min(jnp.maximum(t0, t1), axis=-1)  # [...]
  near = jnp.maximum(near, near_min)
  hit = far > near
  near = jnp.where(hit, near, near_min)
  far = jnp.where(hit, far, near_min)
  return near, far, hit


def stratified_t(
  near: jnp.ndarray, far: jnp.ndarray, n_samples: int, key: Optional[jax.Array] = None
) -> jnp.ndarray:
  """Ray parameters of S stratified samples in [near, far].

  Args:
    near: [R] interval starts.
    far: [R] interval ends.
    n_samples: S, bins per interval.
    key: if given, each sample is uniform inside its bin; else at its centre.

  Returns:
    t: [R, S] sorted sample parameters, sample i in bin
      [near + i delta, near + (i + 1) delta], delta = (far - near) / S.
  """
  delta = (far - near) / n_samples  # [R]
  if key is None:
    u = jnp.full(near.shape + (n_samples,), 0.5, near.dtype)  # [R, S]
  else:
    u = jax.random.uniform(key, near.shape + (n_samples,), near.dtype)
  i = jnp.arange(n_samples, dtype=near.dtype)  # [S]
  return near[..., None] + (i + u) * delta[..., None]  # [R, S]


def render(
  point_fn: PointFn,
  origins: jnp.ndarray,
  directions: jnp.ndarray,
  background: jnp.ndarray,
  spec: RenderSpec,
  key: Optional[jax.Array] = None,
  occupied: Optional[jnp.ndarray] = None,
) -> Dict[str, jnp.ndarray]:
  """Volume-renders R rays through a field (see the module docstring).

  Args:
    point_fn: field, (x [N, 3], d [N, 3] unit) -> {'density' [N], 'rgb' [N, 3],
      optionally 'normal' [N, 3]}; called with N = R * spec.chunk.
    origins: [R, 3] ray origins.
    directions: [R, 3] ray directions, non-zero (need not be unit; t is in
      multiples of |direction|, densities integrate over world length).
    background: [R, 3] colour behind each ray.
    spec: RenderSpec.
    key: PRNG key for jittered (stratified random) samples; None for bin
      centres.
    occupied: [G, G, G] bool occupancy grid (occupancy.occupied): samples
      only where it is set; None: stratified over the whole of [near, far].

  Returns:
    dict with
      'rgb': [R, 3] colour composited over the background,
      'opacity': [R] sum of weights (1 - final transmittance),
      'depth': [R] sum_i w_i t_i, ray units,
      'weights': [R, S] w_i,
      't_vals': [R, S] sample parameters t_i,
      and, if point_fn gives normals,
      'normal': [R, 3] sum_i w_i n_i,
      'orientation': [R] sum_i stop_gradient(w_i) max(0, n_i . d)^2, d the
        unit ray direction (DreamFusion's orientation penalty, per ray).
  """
  origins, directions, background = (
    jnp.asarray(v, jnp.float32) for v in (origins, directions, background)
  )  # [R, 3] each
  n_rays = origins.shape[0]
  chunk, n_chunks = spec.chunk, spec.n_samples // spec.chunk
  points = jax.ShapeDtypeStruct((n_rays * chunk, 3), jnp.float32)
  has_normal = "normal" in jax.eval_shape(point_fn, points, points)

  near, far, hit = ray_aabb(origins, directions, spec.bound, spec.near_min)
  if occupied is None:
    t_vals = stratified_t(near, far, spec.n_samples, key)  # [R, S]
    sampled = far - near  # [R]
  else:
    n_candidates = 4 * occupied.shape[0]  # bins of at most half a cell along any ray
    t_vals, sampled = occupancy_lib.sample_t(
      occupied, origins, directions, near, far, spec.bound, spec.n_samples, n_candidates, key
    )  # [R, S], [R]
  length = jnp.linalg.norm(directions, axis=-1)  # [R]
  unit_d = directions / length[:, None]  # [R, 3]
  # World-space length of one bin; zero on rays that miss the cube.
  delta = jnp.where(hit, sampled / spec.n_samples * length, 0.0)  # [R]
  view_d = jnp.broadcast_to(unit_d[:, None, :], (n_rays, chunk, 3))
  view_d = view_d.reshape(-1, 3)  # [R * chunk, 3]

  def step(carry, t):
    """One chunk: t [R, chunk] -> updated carry and weights [R, chunk]."""
    tau_before, sums = carry  # [R], dict of [R, ...]
    x = origins[:, None, :] + t[..., None] * directions[:, None, :]  # [R, C, 3]
    # Samples lie in the cube up to rounding (and on missed rays, where delta
    # is 0, anywhere); clipping keeps field inputs in their domain.
    x = jnp.clip(x, -spec.bound, spec.bound).reshape(-1, 3)  # [R * C, 3]
    field = point_fn(x, view_d)
    density = field["density"].reshape(n_rays, chunk)  # [R, C]
    tau = density * delta[:, None]  # [R, C]
    # Exclusive cumulative optical depth within the chunk.
    tau_excl = jnp.concatenate([jnp.zeros_like(tau[:, :1]), jnp.cumsum(tau[:, :-1], axis=-1)], -1)
    trans = jnp.exp(-(tau_before[:, None] + tau_excl))  # [R, C]
    alpha = -jnp.expm1(-tau)  # [R, C], 1 - exp(-tau) without cancellation.
    w = alpha * trans  # [R, C]
    rgb = field["rgb"].reshape(n_rays, chunk, 3)  # [R, C, 3]
    new = {
      "rgb": sums["rgb"] + jnp.einsum("rc,rck->rk", w, rgb, precision=_EXACT),
      "opacity": sums["opacity"] + jnp.sum(w, axis=-1),
      "depth": sums["depth"] + jnp.sum(w * t, axis=-1),
    }
    if has_normal:
      normal = field["normal"].reshape(n_rays, chunk, 3)  # [R, C, 3]
      facing = jnp.einsum("rck,rk->rc", normal, unit_d, precision=_EXACT)  # [R, C]
      new["normal"] = sums["normal"] + jnp.einsum("rc,rck->rk", w, normal, precision=_EXACT)
      new["orientation"] = sums["orientation"] + jnp.sum(
        jax.lax.stop_gradient(w) * jnp.square(jnp.maximum(facing, 0.0)), axis=-1
      )
    return (tau_before + jnp.sum(tau, axis=-1), new), w

  if spec.checkpoint:
    step = jax.checkpoint(step, prevent_cse=False)

  zeros = lambda *s: jnp.zeros((n_rays,) + s, jnp.float32)
  sums = {"rgb": zeros(3), "opacity": zeros(), "depth": zeros()}
  if has_normal:
    sums.update(normal=zeros(3), orientation=zeros())
  t_chunks = t_vals.reshape(n_rays, n_chunks, chunk).transpose(1, 0, 2)
  (_, sums), w_chunks = jax.lax.scan(step, (zeros(), sums), t_chunks)
  weights = w_chunks.transpose(1, 0, 2).reshape(n_rays, spec.n_samples)

  out = dict(sums)
  out["rgb"] = sums["rgb"] + (1.0 - sums["opacity"])[:, None] * background
  out["weights"] = weights
  out["t_vals"] = t_vals
  return out


def render_image(
  point_fn: PointFn,
  c2w: jnp.ndarray,
  fovy,
  height: int,
  width: int,
  background_fn: Callable[[jnp.ndarray], jnp.ndarray],
  spec: RenderSpec,
  key: Optional[jax.Array] = None,
  ray_batch: Optional[int] = None,
  occupied: Optional[jnp.ndarray] = None,
) -> Dict[str, jnp.ndarray]:
  """Renders one camera's image (see `render` and `cameras.rays`).

  Args:
    point_fn: field, as for `render`.
    c2w: [4, 4] camera-to-world matrix.
    fovy: scalar vertical field of view, degrees.
    height: H.
    width: W.
    background_fn: unit directions [N, 3] -> background colours [N, 3].
    spec: RenderSpec.
    key: PRNG key for jittered samples, or None.
    ray_batch: if given, render the H * W rays in batches of this many with
      lax.map (the last batch padded), so memory is bounded by one batch.
      With a key, each batch draws its jitter from its own split of the key.
    occupied: [G, G, G] bool occupancy grid, or None (see `render`).

  Returns:
    `render`'s dict with leading [H, W]: 'rgb' [H, W, 3], 'opacity' [H, W],
    'weights' [H, W, S], ...
  """
  c2w = jnp.asarray(c2w, jnp.float32)
  origins, directions = cameras.rays(c2w, fovy, height, width)  # [H, W, 3]
  origins = origins.reshape(-1, 3)  # [H * W, 3]
  directions = directions.reshape(-1, 3)  # [H * W, 3]
  n_rays = height * width

  def render_rays(o, d, k):
    return render(point_fn, o, d, background_fn(d), spec, k, occupied)

  if ray_batch is None:
    out = render_rays(origins, directions, key)
  else:
    n_batches = -(-n_rays // ray_batch)
    pad = n_batches * ray_batch - n_rays
    batched = [
      jnp.pad(v, ((0, pad), (0, 0)), mode="edge").reshape(n_batches, ray_batch, 3)
      for v in (origins, directions)
    ]
    keys = None if key is None else jax.random.split(key, n_batches)
    out = jax.lax.map(lambda a: render_rays(*a), (*batched, keys))
    out = jax.tree.map(lambda v: v.reshape((n_batches * ray_batch,) + v.shape[2:])[:n_rays], out)
  return jax.tree.map(lambda v: v.reshape((height, width) + v.shape[1:]), out)


def opacity_sparsity(out: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """Opacity sparsity loss: mean over rays of sqrt(opacity^2 + 0.01)."""
  opacity = out["opacity"]  # [...]
  return jnp.mean(jnp.sqrt(jnp.square(opacity) + 0.01))


def opaque(out: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """Binary entropy of the opacity, mean over rays.

  With o = clip(opacity, 1e-3, 1 - 1e-3): -(o log o + (1 - o) log(1 - o))
  (natural log; BCE of o with itself as the target, gradient through both),
  minimal when every ray is empty or opaque.
  """
  o = jnp.clip(out["opacity"], 1e-3, 1.0 - 1e-3)  # [...]
  return jnp.mean(-(o * jnp.log(o) + (1.0 - o) * jnp.log1p(-o)))


def orientation(out: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """DreamFusion's orientation loss, mean over rays.

  Per ray sum_i stop_gradient(w_i) max(0, n_i . d)^2 (d the unit ray
  direction), accumulated by `render` as out['orientation'] because it needs
  per-sample normals; it penalises visible normals that face away from the
  camera. Requires a point_fn that returns normals.
  """
  if "orientation" not in out:
    raise ValueError("out has no 'orientation': the point_fn passed to render must return 'normal'")
  return jnp.mean(out["orientation"])


def entropy(out: Dict[str, jnp.ndarray]) -> jnp.ndarray:
  """ProlificDreamer's entropy regulariser on the per-sample weights.

  With w = clip(weights, 1e-5, 1 - 1e-5), the binary entropy in bits
  -(w log2 w + (1 - w) log2(1 - w)) of every sample weight [R, S], averaged
  over all samples of all rays. It pushes each weight to 0 or 1, i.e. towards
  thin, hard surfaces.
  """
  w = jnp.clip(out["weights"], 1e-5, 1.0 - 1e-5)  # [R, S]
  bits = -(w * jnp.log(w) + (1.0 - w) * jnp.log1p(-w)) / math.log(2.0)
  return jnp.mean(bits)
