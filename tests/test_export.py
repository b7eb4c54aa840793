"""Tests of vsdjax.export: PNG views, the orbit video and the mesh."""

import os

import imageio
import imageio.v3 as iio
import jax
import numpy as np
import pytest
import trimesh

from helpers import random_particle
from vsdjax import cameras
from vsdjax.representations.mesh import pieces
from vsdjax.representations.nerf import export, field as field_lib, hashgrid, render, scene

SPEC = scene.SceneSpec(
  field=field_lib.FieldSpec(grid=hashgrid.GridSpec(n_levels=4, log2_table_size=10), hidden=16),
  render=render.RenderSpec(n_samples=32, chunk=8),
)
RES = 32
MESH_RES = 32
THRESHOLD = 10.0
ORBIT = dict(radius=1.5, elevation=15.0, fovy=45.0)
# The video is H.264 (lossy): mean absolute error allowed against the views.
VIDEO_MAE = 8.0

# Reading the video starts ffmpeg with subprocess, which JAX warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork")


render_camera = jax.jit(scene.render_camera, static_argnums=(3, 4, 5))


def _particle(seed: int) -> dict:
  return random_particle(SPEC, seed)


@pytest.fixture(scope="module")
def particle():
  return _particle(0)


@pytest.fixture(scope="module")
def exported(particle, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("particle_0")
  result = export.export_particle(
    particle,
    SPEC,
    out_dir,
    views=2,
    video_frames=4,
    resolution=RES,
    mesh_resolution=MESH_RES,
    mesh_threshold=THRESHOLD,
    ray_batch=256,
    **ORBIT,
  )
  return out_dir, result


def test_views_match_direct_renders(particle, exported):
  out_dir, result = exported
  assert result["views"] == [os.path.join(out_dir, "views", f"view_{i:02d}.png") for i in range(2)]
  cams = cameras.orbit(2, **ORBIT)
  for i, path in enumerate(result["views"]):
    png = iio.imread(path)
    assert png.shape == (RES, RES, 3) and png.dtype == np.uint8
    # Reference: one unbatched render of the same orbit camera.
    rgb = np.asarray(render_camera(particle, cams.c2w[i], cams.fovy[i], RES, RES, SPEC)["rgb"])
    expected = np.round(np.clip(rgb, 0, 1) * 255)
    assert np.max(np.abs(png.astype(np.float64) - expected)) <= 1.0
  # The blob is in front of the background: the views are not uniform.
  assert np.ptp(iio.imread(result["views"][0]).astype(np.float64)) > 20


def test_video_has_the_orbit_frames(exported):
  out_dir, result = exported
  assert result["video"] == os.path.join(out_dir, "video.mp4")
  with imageio.get_reader(result["video"], format="FFMPEG") as reader:
    frames = np.stack(list(reader.iter_data())).astype(np.float64)
  assert frames.shape == (4, RES, RES, 3)
  # Frame 0 (azimuth 0) and frame 2 (azimuth 180) are views 0 and 1.
  for frame, view in ((0, 0), (2, 1)):
    png = iio.imread(result["views"][view]).astype(np.float64)
    assert np.mean(np.abs(frames[frame] - png)) < VIDEO_MAE


def test_video_of_odd_size_is_padded(tmp_path):
  frames = [np.full((5, 7, 3), 40 * i, np.uint8) for i in range(3)]
  export.write_video(frames, str(tmp_path / "odd.mp4"), fps=10)
  with imageio.get_reader(tmp_path / "odd.mp4", format="FFMPEG") as reader:
    read = np.stack(list(reader.iter_data())).astype(np.float64)
  assert read.shape == (3, 6, 8, 3)
  np.testing.assert_allclose(read.mean(axis=(1, 2, 3)), [0, 40, 80], atol=4)


def test_mesh_of_the_initial_blob(particle, exported):
  out_dir, result = exported
  assert result["mesh"] == os.path.join(out_dir, "mesh.obj")
  assert result["mesh_note"] is None
  mesh = trimesh.load(result["mesh"], process=False)
  assert len(mesh.vertices) == result["n_vertices"] > 100
  assert len(mesh.faces) == result["n_faces"]
  # A closed surface of genus 0 with outward normals (positive volume).
  assert mesh.is_watertight
  assert mesh.euler_number == 2
  assert mesh.volume > 0
  vertices = np.asarray(mesh.vertices, np.float32)
  radius = np.linalg.norm(vertices, axis=-1)
  assert np.all(radius < SPEC.field.blob_radius)
  assert np.all(radius > 0.5 * SPEC.field.blob_radius)
  # The vertices lie on the iso-surface: marching cubes interpolates the
  # density linearly inside a grid cell, so log-density is off by a little.
  dens, albedo = jax.jit(field_lib.density_and_albedo, static_argnums=2)(
    particle["field"], vertices, SPEC.field
  )
  log_err = np.abs(np.log(np.asarray(dens)) - np.log(THRESHOLD))
  assert np.max(log_err) < 0.5
  # The vertex colours are the albedo at the vertices.
  colors = np.asarray(mesh.visual.vertex_colors)
  assert colors.shape == (len(vertices), 4) and colors.dtype == np.uint8
  assert np.all(colors[:, 3] == 255)
  np.testing.assert_allclose(colors[:, :3], np.asarray(albedo) * 255, atol=1.0)


def test_the_mesh_drops_floaters_below_mesh_outlier_faces(particle):
  # Strong features in three entries of the finest level's hash table make
  # dense floaters away from the blob wherever those entries are looked up.
  noisy = jax.tree.map(np.array, particle)
  noisy["field"]["grid"]["tables"][-1, :3] = -30.0
  full = export.extract_mesh(noisy["field"], SPEC.field, MESH_RES, THRESHOLD)
  sizes = np.bincount(pieces.face_pieces(full["faces"]))
  assert len(sizes) > 2 and sizes.max() > 40 * np.sort(sizes)[-2]
  clean = export.extract_mesh(noisy["field"], SPEC.field, MESH_RES, THRESHOLD, outlier_faces=0.05)
  keep = pieces.face_pieces(full["faces"]) == np.argmax(sizes)  # the blob alone
  np.testing.assert_array_equal(
    clean["vertices"][clean["faces"]], full["vertices"][full["faces"][keep]]
  )
  used = np.unique(full["faces"][keep])
  np.testing.assert_array_equal(clean["colors"], full["colors"][used])


def test_empty_iso_surface_writes_no_mesh(particle, exported, tmp_path):
  _, first = exported
  result = export.export_particle(
    particle,
    SPEC,
    tmp_path,
    views=1,
    video_frames=1,
    resolution=RES,
    mesh_resolution=MESH_RES,
    mesh_threshold=1e12,
    ray_batch=256,
    **ORBIT,
  )
  assert result["mesh"] is None and result["n_vertices"] == 0
  assert "mesh_threshold" in result["mesh_note"]
  assert result["density_max"] == pytest.approx(first["density_max"])
  assert not os.path.exists(tmp_path / "mesh.obj")
  assert os.path.exists(tmp_path / "views" / "view_00.png")


def test_export_image_and_save_png(tmp_path):
  x0 = np.random.default_rng(0).uniform(-1.3, 1.3, (3, 5, 7)).astype(np.float32)
  path = export.export_image(x0, tmp_path / "sub" / "image.png")
  png = iio.imread(path)
  assert png.shape == (5, 7, 3) and png.dtype == np.uint8
  for c in range(3):
    for i in range(5):
      for j in range(7):
        rgb = min(max((float(x0[c, i, j]) + 1.0) / 2.0, 0.0), 1.0)
        assert abs(int(png[i, j, c]) - rgb * 255) <= 0.5 + 1e-4
  with pytest.raises(ValueError, match="rgb"):
    export.save_png(np.zeros((4, 4)), tmp_path / "a.png")
  with pytest.raises(ValueError, match="rgb"):
    export.save_png(np.full((4, 4, 3), np.nan), tmp_path / "a.png")
  with pytest.raises(ValueError, match="x0"):
    export.export_image(np.zeros((5, 7, 3)), tmp_path / "a.png")


def test_bad_arguments(particle, tmp_path):
  stacked = jax.tree.map(lambda v: v[None], particle)
  with pytest.raises(ValueError, match="leading particle axis"):
    export.export_particle(stacked, SPEC, tmp_path)
  bad = jax.tree.map(lambda v: v, particle)
  bad["background"] = jax.tree.map(lambda v: v * np.nan, bad["background"])
  with pytest.raises(ValueError, match="non-finite"):
    export.export_particle(bad, SPEC, tmp_path)
  for name, value in (
    ("mesh_threshold", 0.0),
    ("views", 0),
    ("fovy", 180.0),
    ("radius", -1.0),
    ("elevation", 95.0),
    ("mesh_resolution", 1),
    ("mesh_threshold", np.inf),
    ("mesh_outlier_faces", 1.5),
  ):
    with pytest.raises(ValueError, match=name):
      export.export_particle(particle, SPEC, tmp_path, **{name: value})
  assert not os.listdir(tmp_path)
