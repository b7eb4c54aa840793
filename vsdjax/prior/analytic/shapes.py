"""Procedural reference scenes rendered exactly by sphere tracing.

The analytic prior and the NeRF-fitting checks need ground-truth images of
known 3D scenes from arbitrary cameras, computed inside a jitted, vmapped
train step. This module provides a few solid shapes given by exact signed
distance functions (SDFs) and a fixed-iteration sphere tracer with Lambertian
shading under a fixed world-space light, so the shading does not depend on
the view and an albedo-only radiance field can represent it exactly.

Conventions:
  - World z-up; every shape is centred at the origin, rotationally symmetric
    ones have their axis along z, and all fit inside the ball of radius
    `BOUND_RADIUS` = 0.5.
  - Rays are (origins [..., 3], directions [..., 3]); directions need not be
    unit length, they are normalised here, and `depth` is the Euclidean
    distance from the origin to the hit point (0 where the ray misses).
  - Ray origins must lie outside the shapes.
  - One `Reference` renders to arrays without a reference axis; a sequence of
    K references renders to arrays with a leading axis of size K.
"""

import dataclasses
import functools
import re
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras

SHAPES = ("sphere", "cube", "torus", "cylinder", "cone")

# Default albedo of each shape when a reference string gives none.
DEFAULT_COLORS = {
  "sphere": "#d04040",
  "cube": "#3060c0",
  "torus": "#40a040",
  "cylinder": "#d0a020",
  "cone": "#9040b0",
}

# Direction towards the light, in world space (unit length).
DEFAULT_LIGHT = (0.4, -0.3, 0.8660254)

# Every shape lies inside this ball; tracing starts where a ray enters it.
BOUND_RADIUS = 0.5


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Sizes of the shapes, in world units."""

  sphere_radius: float = 0.45
  cube_half: float = 0.28  # Half the edge; corners at 0.485.
  torus_major: float = 0.32  # Ring radius (in the xy plane).
  torus_minor: float = 0.14  # Tube radius; outer radius 0.46.
  cylinder_radius: float = 0.3
  cylinder_half_height: float = 0.35  # Rim at distance 0.461.
  cone_radius: float = 0.33  # Base disc radius at z = -cone_half_height.
  cone_half_height: float = 0.35  # Apex at z = +cone_half_height.


DIMS = _Dims()

_TINY = 1e-20  # Floor under squared lengths before sqrt (safe gradients).
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


class Reference(NamedTuple):
  """One reference scene: a shape name from SHAPES and its albedo in [0, 1]."""

  shape: str
  color: tuple


def _hex_to_rgb(text: str) -> tuple:
  """'#rrggbb' -> (r, g, b) floats in [0, 1]."""
  return tuple(int(text[i : i + 2], 16) / 255.0 for i in (1, 3, 5))


def parse_references(text: str) -> tuple:
  """Parses 'sphere:#d04040, cube:#3060c0, torus' into References.

  Items are separated by commas; each is a shape name, optionally followed by
  ':#rrggbb'. A shape without a colour gets DEFAULT_COLORS[shape]. Whitespace
  around names, colours and separators is ignored.

  Args:
    text: the reference list.

  Returns:
    A tuple of Reference, in the order given.

  Raises:
    ValueError: on an empty list or item, an unknown shape or a bad colour;
      the message names the offending item.
  """
  if not isinstance(text, str):
    raise ValueError(f"references: expected a string, got {type(text).__name__}")
  if not text.strip():
    raise ValueError("references: empty; expected e.g. 'sphere:#d04040,cube:#3060c0'")
  refs = []
  for item in text.split(","):
    item = item.strip()
    if not item:
      raise ValueError(f"references {text!r}: empty item between commas")
    name, sep, colour = (s.strip() for s in item.partition(":"))
    if name not in SHAPES:
      raise ValueError(
        f"references: unknown shape {name!r} in item {item!r}; known shapes: {', '.join(SHAPES)}"
      )
    if not sep:
      colour = DEFAULT_COLORS[name]
    elif not _HEX.fullmatch(colour):
      raise ValueError(
        f"references: bad colour {colour!r} in item {item!r}; expected '#rrggbb' (hex)"
      )
    refs.append(Reference(name, _hex_to_rgb(colour)))
  return tuple(refs)


# Hue bins (degrees, upper edges) of the colour names; colours with HSV
# saturation below 0.25 are "white", "grey" or "black" by their value.
_HUES = (
  (15, "red"),
  (40, "orange"),
  (70, "yellow"),
  (170, "green"),
  (200, "cyan"),
  (260, "blue"),
  (300, "purple"),
  (345, "pink"),
  (360, "red"),
)
# Every colour word of colour_name.
COLOUR_NAMES = ("white", "grey", "black") + tuple(dict.fromkeys(name for _, name in _HUES))


def colour_name(color) -> str:
  """A basic colour word for an rgb albedo in [0, 1], by its HSV hue.

  The analytic prior's prompts name references by it ("a red sphere");
  DEFAULT_COLORS name as red (sphere), blue (cube), green (torus), yellow
  (cylinder) and purple (cone).
  """
  r, g, b = (float(v) for v in color)
  hi, lo = max(r, g, b), min(r, g, b)
  if hi <= 0.0 or (hi - lo) / hi < 0.25:
    return "white" if hi > 0.85 else "black" if hi < 0.15 else "grey"
  if hi == r:
    hue = 60.0 * (g - b) / (hi - lo)
  elif hi == g:
    hue = 60.0 * (2.0 + (b - r) / (hi - lo))
  else:
    hue = 60.0 * (4.0 + (r - g) / (hi - lo))
  hue %= 360.0
  return next(name for edge, name in _HUES if hue < edge)


def component_name(ref: Reference) -> str:
  """The analytic prior's name of a reference: its colour word and shape, e.g. "red sphere"."""
  return f"{colour_name(ref.color)} {ref.shape}"


def _safe_norm(x, axis=-1):
  """Euclidean norm over `axis` with a finite gradient at 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x**2, axis=axis), _TINY))


def _sdf_sphere(p):
  return _safe_norm(p) - DIMS.sphere_radius


def _sdf_cube(p):
  q = jnp.abs(p) - DIMS.cube_half  # [..., 3]
  outside = _safe_norm(jnp.maximum(q, 0.0))
  inside = jnp.minimum(jnp.max(q, axis=-1), 0.0)
  return outside + inside


def _sdf_torus(p):
  rho = _safe_norm(p[..., :2])
  q = jnp.stack([rho - DIMS.torus_major, p[..., 2]], axis=-1)  # [..., 2]
  return _safe_norm(q) - DIMS.torus_minor


def _sdf_cylinder(p):
  rho = _safe_norm(p[..., :2])
  d = jnp.stack(
    [rho - DIMS.cylinder_radius, jnp.abs(p[..., 2]) - DIMS.cylinder_half_height], axis=-1
  )
  inside = jnp.minimum(jnp.max(d, axis=-1), 0.0)
  return inside + _safe_norm(jnp.maximum(d, 0.0))


def _sdf_cone(p):
  """Exact SDF of a solid cone (Quilez' sdCone), apex up along z."""
  h = 2.0 * DIMS.cone_half_height
  q = jnp.array([DIMS.cone_radius, -h])  # Base rim relative to the apex.
  # Point in the meridian half-plane (radial, axial), apex at the origin.
  w = jnp.stack([_safe_norm(p[..., :2]), p[..., 2] - DIMS.cone_half_height], axis=-1)  # [..., 2]
  # Nearest points on the slanted side and on the base disc.
  a = w - q * jnp.clip(jnp.sum(w * q, axis=-1, keepdims=True) / jnp.sum(q * q), 0.0, 1.0)
  b = w - q * jnp.stack([jnp.clip(w[..., 0] / q[0], 0.0, 1.0), jnp.ones_like(w[..., 0])], axis=-1)
  dist2 = jnp.minimum(jnp.sum(a**2, axis=-1), jnp.sum(b**2, axis=-1))
  # Positive outside: beyond the slanted side or below the base (q.y < 0).
  s = jnp.maximum(-(w[..., 0] * q[1] - w[..., 1] * q[0]), -(w[..., 1] - q[1]))
  return jnp.sqrt(jnp.maximum(dist2, _TINY)) * jnp.sign(s)


_SDFS = {
  "sphere": _sdf_sphere,
  "cube": _sdf_cube,
  "torus": _sdf_torus,
  "cylinder": _sdf_cylinder,
  "cone": _sdf_cone,
}


def sdf(shape: str, p: jax.Array) -> jax.Array:
  """Signed distance to a shape centred at the origin.

  Args:
    shape: a name from SHAPES.
    p: [..., 3] points in world space.

  Returns:
    [...] signed distance, negative inside, exact (a true Euclidean distance).
  """
  if shape not in _SDFS:
    raise ValueError(f"shape: unknown {shape!r}; known shapes: {', '.join(SHAPES)}")
  p = jnp.asarray(p, jnp.float32)
  if p.ndim < 1 or p.shape[-1] != 3:
    raise ValueError(f"p: expected shape [..., 3], got {p.shape}")
  return _sdf_jit(shape, p)


@functools.partial(jax.jit, static_argnums=0)
def _sdf_jit(shape, p):
  return _SDFS[shape](p)


def _trace(shape, origins, directions, n_steps, t_max, hit_eps):
  """Sphere-traces rays against one shape.

  Args:
    shape: a name from SHAPES.
    origins: [N, 3] ray origins, outside the shape.
    directions: [N, 3] unit directions.
    n_steps: number of sphere-tracing steps.
    t_max: farthest distance along a ray.
    hit_eps: a ray hits where |sdf| < hit_eps.

  Returns:
    t: [N] distance along the ray of the last point reached.
    hit: [N] bool.
  """
  f = _SDFS[shape]
  # Entry to and exit from the bounding ball (|o + t d| = BOUND_RADIUS).
  b = jnp.sum(origins * directions, axis=-1)  # [N]
  c = jnp.sum(origins**2, axis=-1) - (BOUND_RADIUS + hit_eps) ** 2  # [N]
  disc = b**2 - c  # [N]
  half = jnp.sqrt(jnp.maximum(disc, 0.0))
  t_near = jnp.maximum(-b - half, 0.0)  # [N]
  t_far = jnp.minimum(-b + half, t_max)  # [N]
  in_ball = (disc > 0.0) & (t_far > t_near)

  def step(_, t):
    x = origins + t[:, None] * directions  # [N, 3]
    return jnp.clip(t + f(x), t_near, t_far)

  t = jax.lax.fori_loop(0, n_steps, step, t_near)  # [N]
  x = origins + t[:, None] * directions  # [N, 3]
  hit = in_ball & (jnp.abs(f(x)) < hit_eps) & (t < t_far)
  return t, hit


def _normal(shape, x):
  """[..., 3] unit outward normals: the normalised SDF gradient at x [..., 3]."""
  f = _SDFS[shape]
  grad = jax.grad(lambda y: jnp.sum(f(y)))(x)  # [..., 3]
  return grad / _safe_norm(grad)[..., None]


def _as_refs(refs):
  """(tuple of References with float colours, whether refs is a sequence)."""
  single = isinstance(refs, Reference)
  refs = (refs,) if single else tuple(refs)
  return tuple(Reference(r.shape, tuple(float(c) for c in r.color)) for r in refs), not single


def render(
  refs: Union[Sequence[Reference], Reference],
  origins: jax.Array,
  directions: jax.Array,
  background=(1.0, 1.0, 1.0),
  light_dir=DEFAULT_LIGHT,
  ambient: float = 0.3,
  n_steps: int = 64,
  t_max: float = 4.0,
  hit_eps: float = 1e-3,
) -> dict:
  """Renders reference shapes along rays by sphere tracing.

  Shading is Lambertian under a fixed world-space light:
  rgb = color * (ambient + (1 - ambient) * max(0, n . l)), with the normal n
  the normalised SDF gradient at the hit point.

  Args:
    refs: one Reference, or a sequence of K of them (one image each).
    origins: [..., 3] ray origins (broadcast against directions), outside
      the shapes.
    directions: [..., 3] ray directions (normalised here).
    background: colour where a ray misses, broadcastable to [..., 3].
    light_dir: [3] direction towards the light (normalised here).
    ambient: ambient fraction in [0, 1].
    n_steps: fixed number of sphere-tracing steps, >= 1.
    t_max: farthest distance along a ray, > 0.
    hit_eps: a ray hits where |sdf| < hit_eps, > 0.

  Returns:
    A dict with, for one Reference (prefix [K] for a sequence):
      'rgb': [..., 3] shaded colour, background where the ray misses.
      'mask': [...] 1 where the ray hits the shape, else 0.
      'depth': [...] distance from the origin to the hit point, 0 on misses.
      'normal_rgb': [..., 3] the normal map (n + 1) / 2 (world-space unit
        normal n), black (0) where the ray misses.
  """
  refs, batched = _as_refs(refs)
  ambient, t_max, hit_eps = float(ambient), float(t_max), float(hit_eps)
  origins = jnp.asarray(origins, jnp.float32)
  directions = jnp.asarray(directions, jnp.float32)
  shape = jnp.broadcast_shapes(origins.shape, directions.shape)
  background = jnp.broadcast_to(jnp.asarray(background, jnp.float32), shape)  # [..., 3]
  light = np.asarray(light_dir, np.float64)
  light = jnp.asarray(light / np.linalg.norm(light), jnp.float32)  # [3]

  o = jnp.broadcast_to(origins, shape).reshape(-1, 3)  # [N, 3]
  d = jnp.broadcast_to(directions, shape).reshape(-1, 3)  # [N, 3]
  out = _render_rays(
    refs, o, d, background.reshape(-1, 3), light, ambient, n_steps, t_max, hit_eps
  )  # [K, N, ...]
  out = {k: v.reshape(v.shape[:1] + shape[:-1] + v.shape[2:]) for k, v in out.items()}
  return out if batched else {k: v[0] for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _render_rays(refs, o, d, background, light, ambient, n_steps, t_max, hit_eps):
  """Renders K references along flat rays o, d [N, 3]; see `render`.

  Returns:
    {'rgb': [K, N, 3], 'mask': [K, N], 'depth': [K, N], 'normal_rgb': [K, N, 3]}.
  """
  d = d / _safe_norm(d)[:, None]
  out = {"rgb": [], "mask": [], "depth": [], "normal_rgb": []}
  for ref in refs:
    t, hit = _trace(ref.shape, o, d, n_steps, t_max, hit_eps)  # [N], [N]
    normal = _normal(ref.shape, o + t[:, None] * d)  # [N, 3]
    lambert = jnp.maximum(jnp.sum(normal * light, axis=-1), 0.0)  # [N]
    albedo = jnp.asarray(ref.color, jnp.float32)  # [3]
    shaded = albedo * (ambient + (1.0 - ambient) * lambert[:, None])  # [N, 3]
    out["rgb"].append(jnp.where(hit[:, None], shaded, background))
    out["mask"].append(hit.astype(jnp.float32))
    out["depth"].append(jnp.where(hit, t, 0.0))
    out["normal_rgb"].append(jnp.where(hit[:, None], 0.5 * (normal + 1.0), 0.0))
  return {k: jnp.stack(v) for k, v in out.items()}


def render_views(
  refs: Union[Sequence[Reference], Reference],
  c2w: jax.Array,
  fovy: jax.Array,
  height: int,
  width: int,
  supersample: int = 1,
  **kwargs,
) -> dict:
  """Renders references from a batch of pinhole cameras.

  Rays come from `cameras.rays` (OpenGL camera: +x right, +y up, looking
  along -z). With supersample s > 1 each pixel averages an s x s grid of
  rays (box filter): 'mask' becomes the covered fraction and 'depth' the mean
  depth of the sub-rays that hit.

  The background is the same for every camera; to put an image on another
  background b2 (say one random colour per camera), use
  rgb + (1 - mask)[..., None] * (b2 - background), exact also with
  supersampling.

  Args:
    refs: one Reference, or a sequence of K of them.
    c2w: [..., 4, 4] camera-to-world matrices.
    fovy: [...] vertical field of view in degrees (broadcast against c2w's
      batch shape).
    height: image height in pixels.
    width: image width in pixels.
    supersample: rays per pixel along each image axis, >= 1.
    **kwargs: passed to `render` (background, light_dir, ambient, ...).

  Returns:
    A dict with 'rgb' and 'normal_rgb' [..., K?, H, W, 3], 'mask' and 'depth'
    [..., K?, H, W], where K? is present only when refs is a sequence.
  """
  c2w = jnp.asarray(c2w, jnp.float32)
  batch = c2w.shape[:-2]
  fovy = jnp.broadcast_to(jnp.asarray(fovy, jnp.float32), batch)
  s = supersample

  def one(c2w_i, fovy_i):
    origins, directions = cameras.rays(c2w_i, fovy_i, height * s, width * s)
    return render(refs, origins, directions, **kwargs)

  out = jax.vmap(one)(c2w.reshape(-1, 4, 4), fovy.reshape(-1))  # [B, K?, ...]
  if s > 1:
    rgb = out["rgb"].reshape(*out["rgb"].shape[:-3], height, s, width, s, 3)
    mask = out["mask"].reshape(*out["mask"].shape[:-2], height, s, width, s)
    depth = out["depth"].reshape(mask.shape)
    hits = jnp.sum(mask, axis=(-3, -1))  # [B, K?, H, W]
    out = {
      "rgb": jnp.mean(rgb, axis=(-4, -2)),
      "normal_rgb": jnp.mean(out["normal_rgb"].reshape(rgb.shape), axis=(-4, -2)),
      "mask": hits / (s * s),
      "depth": jnp.sum(depth, axis=(-3, -1)) / jnp.maximum(hits, 1.0),
    }
  return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}
