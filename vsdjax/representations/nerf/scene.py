"""One particle's 3D scene: a NeRF field plus its background, rendered from a camera.

This module only composes field.py, background.py, cameras.py and render.py,
and builds their static specs from the `scene`, `render` and `camera` sections
of a config (defaults.py). A particle's parameters are
{'field': field params, 'background': background params}; several particles
stack on a leading axis [n, ...] and `render_camera` is vmapped over them.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from vsdjax import cameras, checks
from vsdjax.representations.nerf import (
  background,
  field as field_lib,
  hashgrid,
  render as render_lib,
)

BACKGROUNDS = ("mlp", "white")


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """Static settings of a particle's scene.

  Attributes:
    field: the NeRF field.
    render: the volume renderer.
    shading: one of field_lib.SHADINGS ("diffuse" / "textureless" use a random light).
    background: "mlp" (view-direction MLP) or "white".
    random_bg_prob: probability of one random solid background colour per render.
    with_normals: also render normals under "albedo" shading (the orientation
      regulariser needs them; shaded modes always compute them).
  """

  field: field_lib.FieldSpec = field_lib.FieldSpec()
  render: render_lib.RenderSpec = render_lib.RenderSpec()
  shading: str = "albedo"
  background: str = "mlp"
  random_bg_prob: float = 0.0
  with_normals: bool = False

  def __post_init__(self):
    checks.check_fields(
      self,
      shading=checks.choice(*field_lib.SHADINGS),
      background=checks.choice(*BACKGROUNDS),
      random_bg_prob=checks.UNIT,
    )


def spec_from_config(config) -> SceneSpec:
  """SceneSpec from a config's `scene` and `render` sections (defaults.py)."""
  s, r = config.scene, config.render
  grid = hashgrid.GridSpec(
    n_levels=s.n_levels,
    n_features=s.n_features,
    log2_table_size=s.log2_table_size,
    base_resolution=s.base_resolution,
    per_level_scale=s.per_level_scale,
  )
  return SceneSpec(
    field=field_lib.FieldSpec(
      grid=grid,
      bound=s.bound,
      hidden=s.hidden,
      density_activation=s.density_activation,
      blob_density=s.blob_density,
      blob_radius=s.blob_radius,
      albedo_init_std=s.albedo_init_std,
    ),
    render=render_lib.RenderSpec(n_samples=r.n_samples, chunk=r.chunk, bound=s.bound),
    shading=s.shading,
    background=s.background,
    random_bg_prob=s.random_bg_prob,
    with_normals=config.loss.orientation > 0,
  )


def camera_ranges_from_config(config) -> cameras.CameraRanges:
  """CameraRanges from a config's `camera` section."""
  c = config.camera
  return cameras.CameraRanges(
    radius=tuple(c.radius),
    elevation=tuple(c.elevation),
    azimuth=tuple(c.azimuth),
    fovy=tuple(c.fovy),
    sphere_prob=c.sphere_prob,
  )


def init(key: jax.Array, spec: SceneSpec) -> dict:
  """One particle: {'field': ..., 'background': ...}."""
  k_field, k_bg = jax.random.split(key)
  return {"field": field_lib.init(k_field, spec.field), "background": background.init(k_bg)}


def render_camera(
  params: dict,
  c2w: jnp.ndarray,
  fovy: jnp.ndarray,
  height: int,
  width: int,
  spec: SceneSpec,
  key: Optional[jax.Array] = None,
  ray_batch: Optional[int] = None,
  occupied: Optional[jnp.ndarray] = None,
) -> dict:
  """Renders one particle from one camera.

  Args:
    params: one particle, from `init`.
    c2w: [4, 4] camera-to-world matrix.
    fovy: [] vertical field of view, degrees.
    height, width: image size.
    spec: SceneSpec.
    key: PRNG key for jittered samples, the random light and the random
      background; None renders deterministically (bin centres, no random
      background, a light from above the camera for shaded modes).
    ray_batch: render in batches of this many rays (bounded memory).
    occupied: [G, G, G] bool occupancy grid: samples only in occupied cells.

  Returns:
    render_lib.render_image's dict: 'rgb' [H, W, 3], 'opacity' [H, W], 'depth',
    'weights' [H, W, S], 'normal' [H, W, 3] when computed.
  """
  eye = c2w[:3, 3]  # [3]
  if key is None:
    k_sample = k_light = k_bg = None
    light = eye / jnp.linalg.norm(eye) + jnp.array([0.0, 0.0, 1.0])
  else:
    k_sample, k_light, k_bg = jax.random.split(key, 3)
    light = field_lib.sample_light(k_light, 1, eye[None])[0]
  point_fn = field_lib.point_fn(
    params["field"],
    spec.field,
    spec.shading,
    light_dir=None if spec.shading == "albedo" else light,
    with_normals=spec.with_normals,
  )

  def background_fn(d):  # [N, 3] -> [N, 3]
    bg = (
      jnp.ones_like(d) if spec.background == "white" else background.color(params["background"], d)
    )
    if key is None or spec.random_bg_prob == 0:
      return bg
    # The same key for every ray batch: one solid colour (or none) per image.
    return background.solid_or_mlp(k_bg, bg, spec.random_bg_prob)

  return render_lib.render_image(
    point_fn, c2w, fovy, height, width, background_fn, spec.render, k_sample, ray_batch, occupied
  )
