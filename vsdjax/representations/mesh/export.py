"""Mesh exports: OBJ (+ MTL + texture PNG), GLB, orbit videos and PNG views.

Per particle folder:
  geometry stage:  mesh.obj, mesh.glb, normals.mp4 (orbit of normal maps),
                   normals_<k>.png
  texture stage:   mesh.obj + mesh.mtl + texture.png (UV atlas), mesh.glb,
                   video.mp4, view_<k>.png

Texture baking: xatlas cuts the mesh into charts and packs them into a UV
atlas; the atlas is rasterized in UV space (clip position (2u - 1, 2v - 1,
0, 1), raster.py), the world position of each texel's surface point is
interpolated from the chart vertices and the texture field's albedo is
looked up there. Texels outside every chart take the mean of their filled
neighbours, a few rings deep, so bilinear lookups at the seams do not bleed
the empty colour. Image row 0 is v = 1 (OBJ's v = 0 is the bottom row).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import trimesh

from vsdjax import cameras
from vsdjax.representations.mesh import marching_tets, raster
from vsdjax.representations.nerf import export as nerf_export, field as field_lib

# Orbit of the videos and views (as the NeRF exports).
_ORBIT = dict(radius=1.5, elevation=15.0, fovy=45.0)
# Rings of texels filled around the charts.
_DILATE_RINGS = 8


def _orbit_frames(draw, n: int):
  """rgb [H, W, 3] in [0, 1] of draw(c2w, fovy) -> rgb over an n-view orbit."""
  cams = cameras.orbit(n, **_ORBIT)
  for c2w, fovy in zip(cams.c2w, cams.fovy):
    yield np.asarray(draw(c2w, fovy))


def _views_and_video(draw, folder: str, stem: str, video: str, export_config) -> None:
  e = export_config
  for k, rgb in enumerate(_orbit_frames(draw, e.views)):
    nerf_export.save_png(rgb, os.path.join(folder, f"{stem}_{k}.png"))
  frames = (nerf_export.to_uint8(rgb) for rgb in _orbit_frames(draw, e.video_frames))
  nerf_export.write_video(frames, os.path.join(folder, video), nerf_export.VIDEO_FPS)


def export_mesh(mesh, folder: str, export_config) -> None:
  """The geometry stage's exports of one host mesh (verts [v, 3], faces [f, 3])."""
  from vsdjax.representations.mesh import dmtet  # Deferred: dmtet imports this module.

  os.makedirs(folder, exist_ok=True)
  verts, faces = mesh
  tm = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
  tm.export(os.path.join(folder, "mesh.obj"))
  tm.export(os.path.join(folder, "mesh.glb"))
  jm = marching_tets.from_host(verts, faces)
  size = export_config.resolution
  draw = jax.jit(lambda m, c2w, fovy: dmtet.render_normals(m, c2w, fovy, size)["rgb"])
  _views_and_video(functools.partial(draw, jm), folder, "normals", "normals.mp4", export_config)


def uv_atlas(verts: np.ndarray, faces: np.ndarray):
  """xatlas charts: (vmapping [a] original vertex of each atlas vertex, faces [f, 3], uv [a, 2])."""
  import xatlas  # Deferred: only exports need it.

  vmapping, atlas_faces, uv = xatlas.parametrize(
    np.asarray(verts, np.float32), np.asarray(faces, np.uint32)
  )
  return vmapping.astype(np.int64), atlas_faces.astype(np.int32), uv.astype(np.float32)


def bake(colour_fn, verts, vmapping, atlas_faces, uv, size: int) -> np.ndarray:
  """The texture image [size, size, 3] in [0, 1] of colour_fn(points [..., 3]) -> [..., 3]."""
  clip = jnp.concatenate(
    [jnp.asarray(uv) * 2.0 - 1.0, jnp.zeros((len(uv), 1)), jnp.ones((len(uv), 1))], axis=-1
  )  # [a, 4]
  faces = jnp.asarray(atlas_faces)
  mask = jnp.ones(len(atlas_faces), bool)

  @jax.jit
  def texels(clip, faces, points):
    r = raster.rasterize(clip, faces, mask, size, size)
    bary = raster.barycentrics(clip, faces, r.tri_id, size, size)
    x = raster.interpolate(points, faces, r.tri_id, bary)  # [S, S, 3]
    return colour_fn(x), r.tri_id >= 0

  rgb, filled = texels(clip, faces, jnp.asarray(verts)[jnp.asarray(vmapping)])
  return dilate(np.asarray(rgb, np.float32), np.asarray(filled))


def dilate(image: np.ndarray, filled: np.ndarray, rings: int = _DILATE_RINGS) -> np.ndarray:
  """Fills empty texels of image [H, W, C] (filled [H, W] bool) from their neighbours."""
  image, filled = image * filled[..., None], filled.copy()
  for _ in range(rings):
    total = np.zeros_like(image)
    count = np.zeros(filled.shape, np.float32)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
      total += np.roll(image * filled[..., None], (dy, dx), axis=(0, 1))
      count += np.roll(filled, (dy, dx), axis=(0, 1))
    grow = ~filled & (count > 0)
    image[grow] = total[grow] / count[grow, None]
    filled = filled | grow
  return image


def export_textured(params, mesh, spec, folder: str, export_config, supersample: int = 1) -> None:
  """The texture stage's exports of one particle (mesh: its padded data['particle'] slice)."""
  from vsdjax.representations.mesh import textured  # Deferred: textured imports this module.

  os.makedirs(folder, exist_ok=True)
  keep = np.asarray(mesh["face_mask"])
  faces = np.asarray(mesh["faces"])[keep]
  used, inverse = np.unique(faces, return_inverse=True)
  verts, faces = np.asarray(mesh["verts"])[used], inverse.reshape(faces.shape)
  vmapping, atlas_faces, uv = uv_atlas(verts, faces)

  def albedo(x):
    return field_lib.density_and_albedo(params["field"], x, spec.field)[1]

  texture = bake(albedo, verts, vmapping, atlas_faces, uv, export_config.texture_size)
  image = nerf_export.to_uint8(texture)
  nerf_export.save_png(texture, os.path.join(folder, "texture.png"))
  _write_obj(os.path.join(folder, "mesh.obj"), verts[vmapping], uv, atlas_faces)
  visual = trimesh.visual.TextureVisuals(
    uv=uv, material=trimesh.visual.material.SimpleMaterial(image=_pil(image))
  )
  tm = trimesh.Trimesh(vertices=verts[vmapping], faces=atlas_faces, visual=visual, process=False)
  tm.export(os.path.join(folder, "mesh.glb"))

  size = export_config.resolution
  jmesh = jax.tree.map(jnp.asarray, mesh)

  @jax.jit
  def draw(params, mesh, c2w, fovy):
    cam = cameras.Cameras(c2w=c2w, fovy=fovy, radius=0.0, elevation=0.0, azimuth=0.0)
    return textured.render_textured(params, mesh, cam, size, spec, None, supersample)["rgb"]

  draw_one = functools.partial(draw, params, jmesh)
  _views_and_video(draw_one, folder, "view", "video.mp4", export_config)


def _pil(image):
  from PIL import Image

  return Image.fromarray(image)


def _write_obj(path: str, verts, uv, faces) -> None:
  """OBJ with one vt per vertex (atlas vertices), its MTL and texture.png beside it."""
  folder, stem = os.path.split(path)
  mtl = os.path.splitext(stem)[0] + ".mtl"
  with open(os.path.join(folder, mtl), "w") as f:
    f.write("newmtl material0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd texture.png\n")
  lines = [f"mtllib {mtl}", "usemtl material0"]
  lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
  lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
  lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in np.asarray(faces) + 1]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
