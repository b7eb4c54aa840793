"""Exports of trained particles: PNG views, a 360-degree video and a mesh.

A 3D particle ({'field': ..., 'background': ...}, no leading particle axis)
is exported to a folder as

  views/view_XX.png  `views` renders evenly spaced in azimuth (XX from 00),
  video.mp4          a 360-degree orbit of `video_frames` frames (H.264 through
                     the ffmpeg binary that imageio-ffmpeg ships),
  mesh.obj           marching cubes (PyMCubes) of the field's density,
                     written with trimesh, with per-vertex colours.

Conventions:
  - Renders are deterministic: `scene.render_camera` with key=None (bin-centre
    samples, no random background). The one-camera render is jitted once per
    (spec, size, ray_batch) and reused for every view and frame; `ray_batch`
    rays are rendered at a time, which bounds memory.
  - Views and the video share one orbit: radius, elevation and fovy fixed,
    azimuth 360 * i / n degrees (cameras.orbit; view 0 looks from +x).
  - The mesh is the iso-surface density = mesh_threshold of field.density
    sampled on a mesh_resolution^3 grid of the points
    -bound + 2 * bound * i / (mesh_resolution - 1), i = 0..mesh_resolution-1,
    along x, y and z (bound = spec.field.bound). The grid is padded with one
    layer of zero density before marching cubes, so the surface is closed
    also where the density reaches the faces of the scene cube; vertices are
    then clipped to [-bound, bound]^3. Pieces with fewer faces than
    mesh_outlier_faces times the largest piece's are dropped (floaters, as
    threestudio's exports drop them; mesh/pieces.py). Vertices are in world
    units (z up), faces are wound counter-clockwise seen from outside
    (outward normals), and each vertex is coloured by the field's albedo
    there (RGBA uint8, alpha 255). The density is evaluated in batches of
    ray_batch * spec.render.n_samples points (as many as one render batch).
  - An empty iso-surface (no density above the threshold) writes no mesh:
    the returned dict then has 'mesh': None, 'n_vertices': 0 and says why in
    'mesh_note'.
  - PNGs are 8-bit RGB, rgb in [0, 1] clipped and rounded to 0..255.
"""

import functools
import math
import os
import warnings

import imageio
import imageio.v3 as iio
import jax
import mcubes
import numpy as np
import trimesh

from vsdjax import cameras, checks
from vsdjax.representations.mesh import pieces
from vsdjax.representations.nerf import field as field_lib, scene

# Frames per second of the orbit video.
VIDEO_FPS = 30


def _check_particle(params, spec) -> None:
  """Checks `params` is one finite 3D particle (no leading particle axis)."""
  if not isinstance(spec, scene.SceneSpec):
    raise ValueError(f"spec must be a scene.SceneSpec, got {type(spec)}")
  message = "params must be one particle {'field': ..., 'background': ...} from scene.init"
  if not isinstance(params, dict) or not {"field", "background"} <= set(params):
    raise ValueError(message)
  try:
    tables = np.shape(params["field"]["grid"]["tables"])
  except (KeyError, TypeError) as e:
    raise ValueError(message) from e
  if len(tables) != 3:
    raise ValueError(
      "params must be one particle without a leading particle axis: "
      f"params['field']['grid']['tables'] must be [L, T, F], got {tables}"
    )
  for leaf in jax.tree.leaves(params):
    checks.check_finite("params", leaf)


def save_png(rgb, path) -> str:
  """Writes an RGB image as an 8-bit PNG.

  Args:
    rgb: [H, W, 3] colours in [0, 1] (clipped to it).
    path: the file; its folder is created if needed.

  Returns:
    path, as a str.
  """
  rgb = np.asarray(rgb, np.float32)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"rgb must have shape [H, W, 3], got {rgb.shape}")
  checks.check_finite("rgb", rgb)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  iio.imwrite(path, to_uint8(rgb), extension=".png")
  return path


def export_image(x0, path) -> str:
  """Writes a 2D particle as a PNG.

  Args:
    x0: [3, h, w] image in x0 units (rgb = (x0 + 1) / 2, clipped to [0, 1]).
    path: the file; its folder is created if needed.

  Returns:
    path, as a str.
  """
  x0 = np.asarray(x0, np.float32)
  if x0.ndim != 3 or x0.shape[0] != 3:
    raise ValueError(f"x0 must have shape [3, h, w], got {x0.shape}")
  return save_png(0.5 * (np.moveaxis(x0, 0, -1) + 1.0), path)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
  """[..., 3] floats in [0, 1] -> uint8 0..255 (clipped, rounded)."""
  return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("spec", "size", "ray_batch"))
def _render_rgb(params, c2w, fovy, spec, size, ray_batch, occupied):
  """[size, size, 3] deterministic render of one particle from one camera."""
  out = scene.render_camera(params, c2w, fovy, size, size, spec, None, ray_batch, occupied)
  return out["rgb"]


def _renders(
  params: dict,
  cams: cameras.Cameras,
  spec: scene.SceneSpec,
  size: int,
  ray_batch: int,
  occupied=None,
):
  """Yields the [size, size, 3] float32 render of each camera of cams [V]."""
  size = checks.check_int("size", size)
  ray_batch = min(checks.check_int("ray_batch", ray_batch), size * size)
  c2w = np.asarray(cams.c2w, np.float32)
  fovy = np.asarray(cams.fovy, np.float32)
  if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or fovy.shape != c2w.shape[:1]:
    raise ValueError(
      "cams must have leading shape [V] (c2w [V, 4, 4], "
      f"fovy [V]), got c2w {c2w.shape}, fovy {fovy.shape}"
    )
  for v in range(c2w.shape[0]):
    yield np.asarray(_render_rgb(params, c2w[v], fovy[v], spec, size, ray_batch, occupied))


def render_views(
  params: dict,
  cams: cameras.Cameras,
  spec: scene.SceneSpec,
  size: int,
  ray_batch: int = 4096,
  occupied=None,
) -> np.ndarray:
  """Deterministic renders of one particle from a batch of cameras.

  The one-camera render is compiled once per (spec, size, ray_batch) and
  called for each camera in turn.

  Args:
    params: one particle (no leading particle axis).
    cams: Cameras with leading shape [V].
    spec: the particle's SceneSpec.
    size: image height and width.
    ray_batch: rays rendered at a time (bounds memory).
    occupied: the particle's [G, G, G] bool occupancy grid, or None (render.render).

  Returns:
    [V, size, size, 3] float32 rgb.
  """
  return np.stack(list(_renders(params, cams, spec, size, ray_batch, occupied)))


@functools.partial(jax.jit, static_argnames=("spec",))
def _density_and_albedo(field_params, x, spec):
  """Density [B] and albedo [B, 3] at world points x [B, 3]."""
  return field_lib.density_and_albedo(field_params, x, spec)


def _field_at(field_params, x: np.ndarray, spec: field_lib.FieldSpec, batch: int):
  """Density [N] and albedo [N, 3] at points x [N, 3], `batch` at a time.

  Every call of the jitted field sees [batch, 3] points (the last batch is
  padded), so one compilation serves all batches and point counts.
  """
  n = x.shape[0]
  n_batches = -(-n // batch)
  x = np.pad(x, ((0, n_batches * batch - n), (0, 0)))  # [n_batches * B, 3]
  dens, albedo = [], []
  for i in range(n_batches):
    d, a = _density_and_albedo(field_params, x[i * batch : (i + 1) * batch], spec)
    dens.append(np.asarray(d))
    albedo.append(np.asarray(a))
  return np.concatenate(dens)[:n], np.concatenate(albedo)[:n]


def extract_mesh(
  field_params: dict,
  spec: field_lib.FieldSpec,
  resolution: int,
  threshold: float,
  batch: int = 2**18,
  outlier_faces: float = 0.0,
) -> dict:
  """Marching cubes of a field's density, with albedo vertex colours.

  See the module docstring for the grid and the conventions.

  Args:
    field_params: one particle's field parameters.
    spec: its FieldSpec.
    resolution: R, grid points per axis (>= 2).
    threshold: density iso-level (> 0).
    batch: points per field evaluation (bounds memory).
    outlier_faces: drop the pieces with fewer faces than this fraction of
      the largest piece's (in [0, 1]; 0 keeps all, 1 the largest piece only).

  Returns:
    {'vertices': [V, 3] float32 world points, 'faces': [F, 3] int64,
     'colors': [V, 3] albedo in [0, 1], 'density_max': float (largest density
     on the grid)}; V = F = 0 for an empty iso-surface.
  """
  resolution = checks.check_int("mesh_resolution", resolution, 2)
  threshold = checks.check_number("mesh_threshold", threshold, 0.0, math.inf)
  batch = min(checks.check_int("batch", batch), resolution**3)
  outlier_faces = checks.check_number("mesh_outlier_faces", outlier_faces, 0.0, 1.0, closed=True)
  bound = spec.bound
  axis = np.linspace(-bound, bound, resolution, dtype=np.float32)  # [R]
  grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)  # [R^3, 3]
  dens, _ = _field_at(field_params, grid, spec, batch)
  dens = dens.reshape(resolution, resolution, resolution)  # [R, R, R]
  density_max = float(dens.max())
  empty = {
    "vertices": np.zeros((0, 3), np.float32),
    "faces": np.zeros((0, 3), np.int64),
    "colors": np.zeros((0, 3), np.float32),
    "density_max": density_max,
  }
  if not density_max > threshold:
    return empty
  # Zero density outside the grid closes the surface at the cube's faces.
  padded = np.pad(dens.astype(np.float64), 1, constant_values=0.0)
  with warnings.catch_warnings():
    # PyMCubes sets an array's shape, which NumPy 2.5 deprecates (a warning per mesh).
    warnings.filterwarnings("ignore", "Setting the shape on a NumPy array", DeprecationWarning)
    vertices, faces = mcubes.marching_cubes(padded, threshold)  # index units
  if vertices.shape[0] == 0:
    return empty
  vertices, faces, _ = pieces.drop_small_pieces(vertices, faces, outlier_faces)
  spacing = 2.0 * bound / (resolution - 1)
  vertices = np.clip(-bound + (vertices - 1.0) * spacing, -bound, bound).astype(
    np.float32
  )  # [V, 3] world units
  _, colors = _field_at(field_params, vertices, spec, batch)
  return {
    "vertices": vertices,
    "faces": faces.astype(np.int64),
    "colors": colors,
    "density_max": density_max,
  }


def write_video(frames, path: str, fps: int) -> None:
  """Writes uint8 frames [H, W, 3] (an iterable) as an H.264 mp4.

  H.264 in yuv420p needs even sizes: odd ones get their last row / column
  repeated.
  """
  with warnings.catch_warnings():
    # JAX warns on any fork; these are subprocess starting ffmpeg, which
    # execs at once.
    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
    writer = imageio.get_writer(
      path,
      format="FFMPEG",
      mode="I",
      fps=fps,
      codec="libx264",
      quality=8,
      macro_block_size=1,
      ffmpeg_log_level="error",
    )
    try:
      for frame in frames:
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        writer.append_data(np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"))
    finally:
      writer.close()


def export_particle(
  params: dict,
  spec: scene.SceneSpec,
  out_dir,
  *,
  views: int = 8,
  video_frames: int = 60,
  resolution: int = 256,
  mesh_resolution: int = 128,
  mesh_threshold: float = 10.0,
  mesh_outlier_faces: float = 0.0,
  radius: float = 1.5,
  elevation: float = 15.0,
  fovy: float = 45.0,
  ray_batch: int = 4096,
  fps: int = VIDEO_FPS,
  occupied=None,
) -> dict:
  """Writes the views, the orbit video and the mesh of one 3D particle.

  Args:
    params: one particle {'field': ..., 'background': ...} (no leading axis).
    spec: its SceneSpec.
    out_dir: output folder (created if needed).
    views: number of PNG views, evenly spaced in azimuth.
    video_frames: frames of the 360-degree video.
    resolution: render size (square) of the views and the video.
    mesh_resolution: marching-cubes grid points per axis.
    mesh_threshold: density iso-level of the mesh, > 0.
    mesh_outlier_faces: the mesh drops pieces with fewer faces than this
      fraction of the largest piece's, in [0, 1].
    radius, elevation, fovy: the orbit (world units, degrees, degrees).
    ray_batch: rays per render batch; the mesh grid is evaluated
      ray_batch * spec.render.n_samples points at a time.
    fps: frames per second of the video.
    occupied: the particle's [G, G, G] bool occupancy grid: views and video
      render with it, as training did (the mesh is the field's alone).

  Returns:
    {'views': [V paths], 'video': path, 'mesh': path or None,
     'n_vertices': int, 'n_faces': int, 'density_max': float (largest density
     on the mesh grid), 'mesh_note': None, or why no mesh was written}.
  """
  _check_particle(params, spec)
  views = checks.check_int("views", views)
  video_frames = checks.check_int("video_frames", video_frames)
  resolution = checks.check_int("resolution", resolution)
  mesh_resolution = checks.check_int("mesh_resolution", mesh_resolution, 2)
  mesh_threshold = checks.check_number("mesh_threshold", mesh_threshold, 0.0, math.inf)
  checks.check_number("mesh_outlier_faces", mesh_outlier_faces, 0.0, 1.0, closed=True)
  radius = checks.check_number("radius", radius, 0.0, math.inf)
  elevation = checks.check_number("elevation", elevation, -90.0, 90.0, closed=True)
  fovy = checks.check_number("fovy", fovy, 0.0, 180.0)
  ray_batch = checks.check_int("ray_batch", ray_batch)
  fps = checks.check_int("fps", fps)
  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.join(out_dir, "views"), exist_ok=True)

  # Views.
  rgb = render_views(
    params, cameras.orbit(views, radius, elevation, fovy), spec, resolution, ray_batch, occupied
  )  # [V, H, W, 3]
  view_paths = [
    save_png(image, os.path.join(out_dir, "views", f"view_{i:02d}.png"))
    for i, image in enumerate(rgb)
  ]

  # Video: one frame rendered (same compiled render) and written at a time.
  orbit = cameras.orbit(video_frames, radius, elevation, fovy)
  frames = _renders(params, orbit, spec, resolution, ray_batch, occupied)
  frames = (to_uint8(frame) for frame in frames)
  video_path = os.path.join(out_dir, "video.mp4")
  write_video(frames, video_path, fps)

  # Mesh.
  mesh = extract_mesh(
    params["field"],
    spec.field,
    mesh_resolution,
    mesh_threshold,
    batch=ray_batch * spec.render.n_samples,
    outlier_faces=mesh_outlier_faces,
  )
  n_vertices, n_faces = len(mesh["vertices"]), len(mesh["faces"])
  mesh_path, note = os.path.join(out_dir, "mesh.obj"), None
  if n_vertices == 0:
    if os.path.exists(mesh_path):  # A stale mesh of an earlier export.
      os.remove(mesh_path)
    mesh_path = None
    note = (
      f"no mesh: the density never exceeds mesh_threshold="
      f"{mesh_threshold} on the grid (max {mesh['density_max']:.4g})"
    )
  else:
    colors = np.concatenate(
      [to_uint8(mesh["colors"]), np.full((n_vertices, 1), 255, np.uint8)], axis=-1
    )  # [V, 4] RGBA
    trimesh.Trimesh(
      vertices=mesh["vertices"], faces=mesh["faces"], vertex_colors=colors, process=False
    ).export(mesh_path)
  return {
    "views": view_paths,
    "video": video_path,
    "mesh": mesh_path,
    "n_vertices": n_vertices,
    "n_faces": n_faces,
    "density_max": mesh["density_max"],
    "mesh_note": note,
  }
