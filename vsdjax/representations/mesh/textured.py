"""The textured-mesh representation (stage 3): a fixed mesh, a learned 3D texture field.

Each particle keeps the mesh its geometry stage ended with, less its small
pieces (fewer faces than mesh.outlier_faces times the largest piece's, as
threestudio drops them; pieces.py), fixed, per particle: data['particle'] =
{'verts': [V, 3], 'faces': [F, 3], 'face_mask': [F]}, padded to the largest
particle. It learns {'field': ..., 'background': ...}, the NeRF particle's
structure: the texture is the field's albedo head (hash grid + MLP +
sigmoid) evaluated at the world position of each pixel's surface point, and
the background is the view-direction MLP (or a random solid colour) of
stage 1. So the texture starts from the stage-1 NeRF's field and background
when the chain has one and mesh.texture_from_nerf is on (the official code's
way; the density head stays unused), or afresh (threestudio's), and the
optimiser groups are stage 1's.

    rgb = mask * albedo(x_surface) + (1 - mask) * background(d),

antialiased at the silhouettes together with the mask.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras, console
from vsdjax.prior.analytic import evaluate, shapes
from vsdjax.representations import Representation
from vsdjax.representations.mesh import dmtet, export, pieces, view
from vsdjax.representations.nerf import background, field as field_lib, scene


@dataclasses.dataclass(frozen=True, eq=False)
class TexturedMesh(Representation):
  """The texture stage's particle (see the module docstring).

  Attributes:
    spec: scene.SceneSpec of the texture field and background (its renderer
      settings are unused).
    camera_ranges: cameras.CameraRanges of the training cameras.
    meshes: {'verts': [n, V, 3], 'faces': [n, F, 3], 'face_mask': [n, F]} host
      arrays, the fixed mesh of each particle.
    start: the stage-1 NeRF particles [n, ...] to start the texture from, or None.
    supersample: s, texture lookups per pixel along each axis (s x s, averaged).
  """

  spec: scene.SceneSpec
  camera_ranges: cameras.CameraRanges
  meshes: dict
  start: dict | None = None
  supersample: int = 1

  @classmethod
  def from_config(cls, config, previous=()) -> "TexturedMesh":
    if not previous:
      raise ValueError("representation 'textured_mesh' needs init_from (a geometry-stage run)")
    geometry_config, geometry_particles = previous[0]
    meshes = []
    # previous[1:]: the runs the geometry stage started from, which its grid was fitted to.
    geometry = dmtet.meshes_of(geometry_config, geometry_particles, previous[1:])
    for i, (verts, faces) in enumerate(geometry):
      verts, faces, dropped = pieces.drop_small_pieces(verts, faces, config.mesh.outlier_faces)
      if dropped:
        console.say(f"particle {i}: dropped {dropped} small mesh pieces (mesh.outlier_faces)")
      meshes.append((verts, faces))
    spec, start = scene.spec_from_config(config), None
    nerf = len(previous) > 1 and previous[1][0].representation == "nerf"
    if nerf and config.mesh.texture_from_nerf:
      # The texture starts from the stage-1 field, so it keeps that field's settings.
      start = previous[1][1]
      spec = dataclasses.replace(spec, field=scene.spec_from_config(previous[1][0]).field)
    return cls(
      spec=spec,
      camera_ranges=scene.camera_ranges_from_config(config),
      meshes=pad_meshes(meshes),
      start=start,
      supersample=config.mesh.supersample,
    )

  def data(self):
    particle = dict(self.meshes)
    if self.start is not None:
      particle["start"] = self.start
    return {"shared": {}, "particle": particle}

  def init(self, key, data):
    if "start" in data["particle"]:
      return jax.tree.map(jnp.asarray, data["particle"]["start"])
    return scene.init(key, self.spec)

  def sample_camera(self, key):
    return jax.tree.map(lambda v: v[0], cameras.sample(key, self.camera_ranges, 1))

  def render(self, params, data, camera, resolution, key):
    return render_textured(
      params, data["particle"], camera, resolution, self.spec, key, self.supersample
    )

  def param_labels(self, params):
    labels = jax.tree.map(lambda _: "rest", params)
    labels["field"]["grid"] = jax.tree.map(lambda _: "grid", params["field"]["grid"])
    return labels

  def export(self, particles, data, folder, export_config):
    n = jax.tree.leaves(particles)[0].shape[0]
    for i in range(n):
      console.say(f"exporting particle {i + 1}/{n} (textured mesh, video, views) to {folder} ...")
      params, mesh = (jax.tree.map(lambda v, i=i: v[i], t) for t in (particles, data["particle"]))
      folder_i = os.path.join(folder, f"particle_{i}")
      export.export_textured(params, mesh, self.spec, folder_i, export_config, self.supersample)

  def evaluate(self, particles, data, references, sigma_ref, export_config, size):
    """Held-out PSNR of renders sampled at the pixel centres (one texture lookup per pixel, no
    antialiasing), as the references and stage 1's volume renders are."""
    del sigma_ref
    cams = evaluate.heldout_cameras(export_config.eval_views)
    ref = np.asarray(shapes.render_views(references, cams.c2w, cams.fovy, size, size)["rgb"])
    draw = jax.jit(
      lambda p, m, c2w, fovy: render_textured(
        p,
        m,
        cameras.Cameras(c2w=c2w, fovy=fovy, radius=0.0, elevation=0.0, azimuth=0.0),
        size,
        self.spec,
        None,
        antialias=False,
      )["rgb"]
    )
    mse = []
    for i in range(jax.tree.leaves(particles)[0].shape[0]):
      params, mesh = (jax.tree.map(lambda v, i=i: v[i], t) for t in (particles, data["particle"]))
      rgb = np.stack([np.asarray(draw(params, mesh, c, f)) for c, f in zip(cams.c2w, cams.fovy)])
      err = np.square(rgb[:, None].astype(np.float64) - ref)  # [V, K, H, W, 3]
      mse.append(np.mean(err, axis=(0, 2, 3, 4)))  # [K]
    out = evaluate.summary(np.stack(mse), evaluate.unique_names([r.shape for r in references]))
    out.update(n_views=export_config.eval_views, size=size)
    return out


def pad_meshes(meshes) -> dict:
  """Stacks host meshes [(verts [v_i, 3], faces [f_i, 3])] padded to the largest."""
  n_v = max(len(v) for v, _ in meshes)
  n_f = max(len(f) for _, f in meshes)
  verts = np.zeros((len(meshes), n_v, 3), np.float32)
  faces = np.zeros((len(meshes), n_f, 3), np.int32)
  mask = np.zeros((len(meshes), n_f), bool)
  for i, (v, f) in enumerate(meshes):
    verts[i, : len(v)], faces[i, : len(f)], mask[i, : len(f)] = v, f, True
  return {"verts": verts, "faces": faces, "face_mask": mask}


def render_textured(
  params, mesh, camera, size: int, spec, key, supersample: int = 1, antialias: bool = True
) -> dict:
  """One particle's render: 'rgb' [H, W, 3], 'opacity' [H, W] and raster 'metrics'.

  key None: deterministic (the background MLP); otherwise the background is
  a random solid colour with probability spec.random_bg_prob. With
  supersample s > 1 the image is drawn at s times the size and each s x s
  block averaged (a box filter over the texture lookups). antialias False:
  sampled at the pixel centres only (view.finish).
  """
  s = supersample
  if s > 1:
    out = render_textured(params, mesh, camera, size * s, spec, key)
    pool = lambda x: x.reshape(size, s, size, s, *x.shape[2:]).mean(axis=(1, 3))
    return {"rgb": pool(out["rgb"]), "opacity": pool(out["opacity"]), "metrics": out["metrics"]}
  faces, face_mask = mesh["faces"], mesh["face_mask"]
  v = view.draw(mesh["verts"], faces, face_mask, camera.c2w, camera.fovy, size)
  x = view.attribute(v, mesh["verts"], faces)  # [H, W, 3] surface points
  _, albedo = field_lib.density_and_albedo(params["field"], x, spec.field)  # [H, W, 3]
  _, d = cameras.rays(camera.c2w, camera.fovy, size, size)  # [H, W, 3]
  if spec.background == "white":
    bg = jnp.ones_like(albedo)
  else:
    bg = background.color(params["background"], d)  # [H, W, 3]
  if key is not None and spec.random_bg_prob > 0:
    bg = background.solid_or_mlp(key, bg, spec.random_bg_prob)
  m = v.mask[..., None]
  rgb, opacity = view.finish(v, m * albedo + (1.0 - m) * bg, faces, face_mask, antialias)
  return {"rgb": rgb, "opacity": opacity, "metrics": {"raster_tile_overflow": v.overflow}}
