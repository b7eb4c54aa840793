"""Cameras around the object, ray generation and view-dependent prompts.

Conventions (used by every module of vsdjax):

- World frame: z is up and the object sits at the origin.
- A camera is given by its distance `radius` to the origin, its `elevation` (the
  angle above the xy-plane, in degrees) and its `azimuth` (degrees, measured in
  the xy-plane from +x towards +y). Azimuth 0 looks at the object from +x,
  azimuth 90 from +y. The camera position is
      radius * (cos(e) cos(a), cos(e) sin(a), sin(e)).
- `fovy` is the vertical field of view in degrees; pixels are square, so the
  horizontal field of view follows from the aspect ratio width / height.
- Camera-to-world matrices c2w [..., 4, 4] follow OpenGL / NeRF: in camera space
  +x points right, +y up and the camera looks along -z. Columns 0..2 of c2w are
  those axes expressed in world coordinates, column 3 is the camera position and
  the last row is (0, 0, 0, 1).
- Cameras built from spherical coordinates always look at the origin and keep
  "right" horizontal, right = (-sin(a), cos(a), 0); this frame stays well
  defined straight above or below the object (elevation +-90).
- `sample` draws radius, elevation, azimuth and fovy independently and
  uniformly in their ranges; with probability `sphere_prob` a camera's
  elevation is instead uniform on the sphere's band between the two
  elevations (uniform in sin(elevation)), as threestudio draws half its cameras.
- Images have row 0 at the top; rays go through pixel centres.
- View labels: "overhead" if elevation > 60; otherwise, with
  the azimuth wrapped to [-180, 180), "front" if |azimuth| < front, "back" if
  |azimuth| > 180 - back and "side" otherwise. ProlificDreamer's stages 1 and 3
  use front = back = 30 degrees (threestudio's configs; the official code's
  60-degree front sector); threestudio's default, which its stage 2 keeps, is 45.
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks

VIEW_NAMES = ("front", "side", "back", "overhead")

# View-label thresholds, in degrees (threestudio's prompt processor).
_OVERHEAD_ELEVATION = 60.0
FRONT_THRESHOLD = 30.0  # |azimuth| < this: front
BACK_THRESHOLD = 30.0  # |azimuth| > 180 - this: back


@dataclasses.dataclass(frozen=True)
class CameraRanges:
  """(min, max) ranges that `sample` draws cameras from, uniformly.

  Attributes:
    radius: distance of the camera to the origin, world units, min > 0.
    elevation: degrees above the xy-plane, within [-90, 90].
    azimuth: degrees; any finite range (angles wrap around).
    fovy: vertical field of view in degrees, within (0, 180).
    sphere_prob: probability, per camera, that the elevation is uniform on the
      sphere (in sin(elevation)) over its range instead of uniform in degrees.
  """

  radius: Tuple[float, float] = (1.0, 1.5)
  elevation: Tuple[float, float] = (-10.0, 45.0)
  azimuth: Tuple[float, float] = (-180.0, 180.0)
  fovy: Tuple[float, float] = (40.0, 70.0)
  sphere_prob: float = 0.0

  def __post_init__(self):
    # Plain float tuples, so instances hash and compare by value.
    checks.check_fields(
      self,
      radius=checks.interval(0.0, lo_open=True),
      elevation=checks.interval(-90.0, 90.0),
      azimuth=checks.interval(),
      fovy=checks.interval(0.0, 180.0, lo_open=True, hi_open=True),
      sphere_prob=checks.number(0.0, 1.0),
    )


class Cameras(NamedTuple):
  """A batch of cameras with any leading shape [...]."""

  c2w: jnp.ndarray  # [..., 4, 4] camera-to-world, OpenGL axes.
  fovy: jnp.ndarray  # [...] vertical field of view, degrees.
  elevation: jnp.ndarray  # [...] degrees.
  azimuth: jnp.ndarray  # [...] degrees.
  radius: jnp.ndarray  # [...] world units.


def _safe_normalize(v: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """v / |v| along the last axis; zero vectors stay zero, gradients finite."""
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  return v * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _assemble_c2w(right, up, back, position) -> jnp.ndarray:
  """Stacks axis columns [..., 3] and the position [..., 3] into [..., 4, 4]."""
  rot = jnp.stack([right, up, back, position], axis=-1)  # [..., 3, 4]
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], rot.dtype), rot.shape[:-2] + (1, 4))
  return jnp.concatenate([rot, bottom], axis=-2)  # [..., 4, 4]


@jax.jit
def _look_at(eye, target, up):
  """look_at's maths on validated float32 inputs [..., 3]."""
  forward = _safe_normalize(target - eye)  # [..., 3]
  up = _safe_normalize(up)  # [..., 3]
  right = jnp.cross(forward, up)  # [..., 3]
  norm = jnp.linalg.norm(right, axis=-1, keepdims=True)  # [..., 1]
  # Fallback when forward is parallel to up: any horizontal direction.
  axis = jax.nn.one_hot(jnp.argmin(jnp.abs(up), axis=-1), 3, dtype=up.dtype)
  fallback = _safe_normalize(jnp.cross(up, axis))  # [..., 3]
  ok = norm > 1e-6
  right = jnp.where(ok, right / jnp.where(ok, norm, 1.0), fallback)
  right = jnp.broadcast_to(right, jnp.broadcast_shapes(right.shape, forward.shape))
  cam_up = jnp.cross(right, forward)  # [..., 3], unit: right _|_ forward.
  eye = jnp.broadcast_to(eye, right.shape)
  return _assemble_c2w(right, cam_up, -forward, eye)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> jnp.ndarray:
  """Camera-to-world matrix of a camera at `eye` looking at `target`.

  The camera's -z axis points from eye to target and its +x axis ("right") is
  horizontal with respect to `up`. When the view direction is parallel to
  `up` (e.g. the eye straight above the target), "right" falls back to
  normalize(up x e_k), e_k the world axis least aligned with `up`; for the
  default up this is +y, the same frame `from_spherical` gives at azimuth 0.

  Args:
    eye: [..., 3] camera positions.
    target: [..., 3] points looked at (broadcasts against eye).
    up: [3] or [..., 3] world up direction, need not be unit.

  Returns:
    c2w: [..., 4, 4] float32 camera-to-world matrices.
  """
  eye = jnp.asarray(eye, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  up = jnp.asarray(up, jnp.float32)
  for name, v in (("eye", eye), ("target", target), ("up", up)):
    if v.ndim < 1 or v.shape[-1] != 3:
      raise ValueError(f"{name} must have shape [..., 3], got {v.shape}")
    checks.check_finite(name, v)
  if checks.is_concrete(up) and np.any(np.linalg.norm(np.asarray(up), axis=-1) == 0):
    raise ValueError("up must be a non-zero vector")
  if (
    checks.is_concrete(eye)
    and checks.is_concrete(target)
    and np.any(np.all(np.asarray(eye) == np.asarray(target), axis=-1))
  ):
    raise ValueError("eye and target must differ")

  return _look_at(eye, target, up)


@jax.jit
def _spherical_c2w(radius, elevation, azimuth):
  """c2w [..., 4, 4] of cameras looking at the origin; inputs [...] float32."""
  e = jnp.deg2rad(elevation)  # [...]
  a = jnp.deg2rad(azimuth)  # [...]
  ce, se, ca, sa = jnp.cos(e), jnp.sin(e), jnp.cos(a), jnp.sin(a)
  back = jnp.stack([ce * ca, ce * sa, se], axis=-1)  # [..., 3], camera +z.
  right = jnp.stack([-sa, ca, jnp.zeros_like(a)], axis=-1)  # [..., 3]
  up = jnp.stack([-se * ca, -se * sa, ce], axis=-1)  # [..., 3] = back x right.
  return _assemble_c2w(right, up, back, radius[..., None] * back)


def from_spherical(radius, elevation, azimuth, fovy) -> Cameras:
  """Cameras looking at the origin from spherical coordinates.

  Args:
    radius: [...] distance to the origin, > 0.
    elevation: [...] degrees above the xy-plane.
    azimuth: [...] degrees from +x towards +y.
    fovy: [...] vertical field of view in degrees, in (0, 180).
    All four broadcast against each other.

  Returns:
    Cameras whose fields have the broadcast shape [...] (c2w [..., 4, 4]).
  """
  named = (("radius", radius), ("elevation", elevation), ("azimuth", azimuth), ("fovy", fovy))
  for name, v in named:
    checks.check_finite(name, v)
  checks.check_range("radius", radius, 0.0, math.inf, True, True)
  checks.check_range("fovy", fovy, 0.0, 180.0, True, True)
  try:
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for _, v in named))
  except ValueError as e:
    raise ValueError(
      "radius, elevation, azimuth and fovy must broadcast, got "
      f"shapes {[jnp.shape(v) for _, v in named]}"
    ) from e
  radius, elevation, azimuth, fovy = (
    jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for _, v in named
  )

  return Cameras(
    c2w=_spherical_c2w(radius, elevation, azimuth),
    fovy=fovy,
    elevation=elevation,
    azimuth=azimuth,
    radius=radius,
  )


def sample(key: jax.Array, ranges: CameraRanges, n: int) -> Cameras:
  """Draws n cameras, each parameter uniform in its range of `ranges` (elevation: see
  CameraRanges.sphere_prob).

  Args:
    key: PRNG key.
    ranges: CameraRanges (degrees and world units).
    n: number of cameras.

  Returns:
    Cameras with leading shape [n].
  """
  if not isinstance(ranges, CameraRanges):
    raise ValueError(f"ranges must be a CameraRanges, got {type(ranges)}")
  n = checks.check_int("n", n)
  k_r, k_e, k_a, k_f, k_sphere = jax.random.split(key, 5)

  def uniform(k, bounds):
    return jax.random.uniform(k, (n,), jnp.float32, bounds[0], bounds[1])

  elevation = uniform(k_e, ranges.elevation)  # [n] degrees
  if ranges.sphere_prob > 0.0:
    k_pick, k_sin = jax.random.split(k_sphere)
    sin_range = tuple(math.sin(math.radians(e)) for e in ranges.elevation)
    on_sphere = jnp.rad2deg(jnp.arcsin(jnp.clip(uniform(k_sin, sin_range), -1.0, 1.0)))
    elevation = jnp.where(
      jax.random.bernoulli(k_pick, ranges.sphere_prob, (n,)), on_sphere, elevation
    )
  return from_spherical(
    uniform(k_r, ranges.radius), elevation, uniform(k_a, ranges.azimuth), uniform(k_f, ranges.fovy)
  )


def orbit(n_views: int, radius: float, elevation: float, fovy: float) -> Cameras:
  """A 360-degree ring of cameras at fixed radius and elevation (for videos).

  View i has azimuth 360 * i / n_views degrees, wrapped to [-180, 180): the
  ring starts at the front view and turns towards +y, without repeating the
  first view at the end.

  Returns:
    Cameras with leading shape [n_views].
  """
  n_views = checks.check_int("n_views", n_views)
  azimuth = 360.0 * jnp.arange(n_views, dtype=jnp.float32) / n_views  # [n]
  azimuth = jnp.mod(azimuth + 180.0, 360.0) - 180.0
  return from_spherical(radius, elevation, azimuth, fovy)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rays(c2w, fovy, height, width):
  """rays' maths on validated inputs c2w [..., 4, 4], fovy [...]."""
  batch = jnp.broadcast_shapes(c2w.shape[:-2], fovy.shape)
  focal = 0.5 * height / jnp.tan(0.5 * jnp.deg2rad(fovy))  # [...]
  focal = jnp.broadcast_to(focal, batch)[..., None, None]  # [..., 1, 1]
  cols = jnp.arange(width, dtype=jnp.float32) + 0.5 - 0.5 * width  # [W]
  rows = jnp.arange(height, dtype=jnp.float32) + 0.5 - 0.5 * height  # [H]
  x = jnp.broadcast_to(cols[None, :] / focal, batch + (height, width))
  y = jnp.broadcast_to(-rows[:, None] / focal, batch + (height, width))
  d_cam = jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)  # [..., H, W, 3]
  rot = jnp.broadcast_to(c2w[..., :3, :3], batch + (3, 3))  # [..., 3, 3]
  # HIGHEST: a TPU's default float32 matmul is one bfloat16 pass (8 significant bits), which
  # would move a 512x512 camera's rays by pixels and merge adjacent ones.
  d_world = jnp.einsum(
    "...ij,...hwj->...hwi", rot, d_cam, precision=jax.lax.Precision.HIGHEST
  )  # [..., H, W, 3]
  directions = _safe_normalize(d_world)
  position = jnp.broadcast_to(c2w[..., :3, 3], batch + (3,))  # [..., 3]
  origins = jnp.broadcast_to(position[..., None, None, :], directions.shape)
  return origins, directions


def rays(c2w, fovy, height: int, width: int):
  """Rays through the pixel centres of a pinhole camera.

  Pixel (i, j) (row i from the top, column j from the left) has camera-space
  direction ((j + 0.5 - W / 2) / f, -(i + 0.5 - H / 2) / f, -1) with focal
  length f = (H / 2) / tan(fovy / 2) in pixels.

  Args:
    c2w: [..., 4, 4] camera-to-world matrices (usually [4, 4]).
    fovy: [...] vertical field of view in degrees (broadcasts against c2w's
      leading shape).
    height: H, image rows.
    width: W, image columns.

  Returns:
    origins: [..., H, W, 3] the camera positions.
    directions: [..., H, W, 3] unit world-space directions.
  """
  c2w = jnp.asarray(c2w, jnp.float32)
  fovy = jnp.asarray(fovy, jnp.float32)
  if c2w.ndim < 2 or c2w.shape[-2:] != (4, 4):
    raise ValueError(f"c2w must have shape [..., 4, 4], got {c2w.shape}")
  height = checks.check_int("height", height)
  width = checks.check_int("width", width)
  try:
    jnp.broadcast_shapes(c2w.shape[:-2], fovy.shape)
  except ValueError as e:
    raise ValueError(
      f"fovy shape {fovy.shape} does not broadcast with c2w's leading shape {c2w.shape[:-2]}"
    ) from e
  checks.check_finite("c2w", c2w)
  checks.check_finite("fovy", fovy)
  checks.check_range("fovy", fovy, 0.0, 180.0, True, True)

  return _rays(c2w, fovy, height, width)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _view_label(elevation, azimuth, front, back):
  """view_label's maths on float32 inputs [...]."""
  # |azimuth| after wrapping to [-180, 180): [...] in [0, 180].
  wrapped = jnp.abs(jnp.mod(azimuth + 180.0, 360.0) - 180.0)
  label = jnp.where(wrapped < front, 0, jnp.where(wrapped > 180.0 - back, 2, 1))
  label = jnp.where(elevation > _OVERHEAD_ELEVATION, 3, label)
  return label.astype(jnp.int32)


def check_thresholds(front: float, back: float) -> None:
  """Raises ValueError unless 0 <= front, back and front + back <= 180 (degrees)."""
  for name, value in (("front", front), ("back", back)):
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 180.0:
      raise ValueError(f"{name} threshold must be a number of degrees in [0, 180], got {value!r}")
  if front + back > 180.0:
    raise ValueError(f"front + back thresholds must be <= 180 degrees, got {front} + {back}")


def view_label(
  elevation, azimuth, front: float = FRONT_THRESHOLD, back: float = BACK_THRESHOLD
) -> jnp.ndarray:
  """View-direction class of cameras, as an index into VIEW_NAMES.

  Args:
    elevation: [...] degrees.
    azimuth: [...] degrees, any value (wrapped to [-180, 180) here).
    front: half-width of the front sector in degrees: |azimuth| < front.
    back: half-width of the back sector: |azimuth| > 180 - back.

  Returns:
    [...] int32: 0 front, 1 side, 2 back, 3 overhead (elevation > 60 first).
  """
  elevation = jnp.asarray(elevation, jnp.float32)
  azimuth = jnp.asarray(azimuth, jnp.float32)
  checks.check_finite("elevation", elevation)
  checks.check_finite("azimuth", azimuth)
  check_thresholds(front, back)
  return _view_label(elevation, azimuth, float(front), float(back))


def view_prompt(prompt: str, label) -> str:
  """'<prompt>, <view> view' for a (host-side, concrete) label in 0..3."""
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a str, got {type(prompt)}")
  if isinstance(label, jax.core.Tracer):
    raise ValueError("label must be concrete (call view_prompt on the host)")
  value = np.asarray(label)
  if value.shape != () or not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"label must be an integer scalar, got {label!r}")
  if not 0 <= int(value) < len(VIEW_NAMES):
    raise ValueError(f"label must be in 0..{len(VIEW_NAMES) - 1}, got {label!r}")
  return f"{prompt}, {VIEW_NAMES[int(value)]} view"
