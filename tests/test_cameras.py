"""Tests for vsdjax.cameras against direct numpy geometry."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import cameras

# A grid of camera angles including the poles and the azimuth wrap-around.
_ELEV = np.array([-90.0, -45.0, -10.0, 0.0, 30.0, 60.0, 89.0, 90.0])
_AZIM = np.array([-180.0, -135.0, -30.0, 0.0, 45.0, 90.0, 170.0, 400.0])


def _spherical_grid():
  e, a = np.meshgrid(_ELEV, _AZIM, indexing="ij")  # [8, 8]
  radius = 1.0 + 0.1 * np.arange(e.size).reshape(e.shape)  # [8, 8]
  return radius, e, a


def test_from_spherical_frame():
  radius, e, a = _spherical_grid()
  cams = cameras.from_spherical(radius, e, a, 50.0)
  c2w = np.asarray(cams.c2w, np.float64)  # [8, 8, 4, 4]
  assert c2w.shape == e.shape + (4, 4)
  assert cams.fovy.shape == e.shape and np.all(np.asarray(cams.fovy) == 50.0)
  rot = c2w[..., :3, :3]
  eye = np.broadcast_to(np.eye(3), rot.shape)
  np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, eye, atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
  np.testing.assert_array_equal(
    c2w[..., 3, :], np.broadcast_to([0.0, 0.0, 0.0, 1.0], e.shape + (4,))
  )
  # Position from the spherical formula, written out per camera.
  for idx in np.ndindex(e.shape):
    er, ar = math.radians(e[idx]), math.radians(a[idx])
    want = radius[idx] * np.array(
      [math.cos(er) * math.cos(ar), math.cos(er) * math.sin(ar), math.sin(er)]
    )
    np.testing.assert_allclose(c2w[idx][:3, 3], want, atol=1e-5)
  # The camera's -z axis points at the origin, +x stays horizontal.
  pos = c2w[..., :3, 3]
  to_origin = -pos / np.linalg.norm(pos, axis=-1, keepdims=True)
  np.testing.assert_allclose(-c2w[..., :3, 2], to_origin, atol=1e-6)
  np.testing.assert_allclose(c2w[..., 2, 0], 0.0, atol=1e-7)
  # Camera "up" has a non-negative world-z component (never upside down).
  assert np.all(c2w[..., 2, 1] >= -1e-6)


def test_azimuth_convention():
  cams = cameras.from_spherical(2.0, 0.0, np.array([0.0, 90.0]), 60.0)
  np.testing.assert_allclose(cams.c2w[0, :3, 3], [2.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(cams.c2w[1, :3, 3], [0.0, 2.0, 0.0], atol=1e-6)


def test_look_at_matches_from_spherical_and_targets():
  radius, e, a = _spherical_grid()
  cams = cameras.from_spherical(radius, e, a, 50.0)
  via_look_at = cameras.look_at(cams.c2w[..., :3, 3], np.zeros(3))
  # Equal everywhere, the poles included (look_at's fallback frame matches
  # from_spherical's at azimuth 0; at the poles with other azimuths the
  # horizontal "right" is a free choice, so compare there only for a = 0).
  pole = np.abs(e) == 90.0
  keep = ~pole | (np.mod(a, 360.0) == 0.0)
  np.testing.assert_allclose(np.asarray(via_look_at)[keep], np.asarray(cams.c2w)[keep], atol=2e-6)

  # Arbitrary eye / target / up: orthonormal, -z towards target, x _|_ up.
  rng = np.random.default_rng(0)
  eye = rng.normal(size=(5, 3))
  target = rng.normal(size=(5, 3))
  up = np.array([0.3, -1.0, 0.5])
  c2w = np.asarray(cameras.look_at(eye, target, up), np.float64)
  rot = c2w[..., :3, :3]
  np.testing.assert_allclose(
    np.swapaxes(rot, -1, -2) @ rot, np.broadcast_to(np.eye(3), rot.shape), atol=1e-6
  )
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
  fwd = (target - eye) / np.linalg.norm(target - eye, axis=-1, keepdims=True)
  np.testing.assert_allclose(-rot[..., 2], fwd, atol=1e-6)
  np.testing.assert_allclose(rot[..., 0] @ up, 0.0, atol=1e-6)
  np.testing.assert_allclose(c2w[..., :3, 3], eye, atol=1e-6)

  # Straight above and below: finite and orthonormal.
  for z in (3.0, -3.0):
    m = np.asarray(cameras.look_at([0.0, 0.0, z], [0.0, 0.0, 0.0]))
    assert np.all(np.isfinite(m))
    np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(-m[:3, 2], [0.0, 0.0, -np.sign(z)], atol=1e-6)


def test_sample_and_orbit():
  ranges = cameras.CameraRanges(
    radius=(1.0, 1.5), elevation=(-10.0, 45.0), azimuth=(-180.0, 180.0), fovy=(40.0, 70.0)
  )
  cams = cameras.sample(jax.random.key(0), ranges, 256)
  for name in ("radius", "elevation", "azimuth", "fovy"):
    v = np.asarray(getattr(cams, name))
    low, high = getattr(ranges, name)
    assert v.shape == (256,)
    assert np.all(v >= low) and np.all(v <= high), name
    # Uniform: both halves of each range are visited about equally.
    assert 0.35 < np.mean(v < 0.5 * (low + high)) < 0.65, name
  np.testing.assert_allclose(np.linalg.norm(cams.c2w[:, :3, 3], axis=-1), cams.radius, rtol=1e-6)
  again = cameras.sample(jax.random.key(0), ranges, 256)
  np.testing.assert_array_equal(again.c2w, cams.c2w)
  other = cameras.sample(jax.random.key(1), ranges, 256)
  assert not np.allclose(other.azimuth, cams.azimuth)

  ring = cameras.orbit(8, 1.5, 20.0, 45.0)
  assert ring.c2w.shape == (8, 4, 4)
  az = np.asarray(ring.azimuth)
  np.testing.assert_allclose(np.mod(az, 360.0), 45.0 * np.arange(8), atol=1e-5)
  assert np.all(az >= -180.0) and np.all(az < 180.0)
  np.testing.assert_allclose(ring.elevation, 20.0)
  np.testing.assert_allclose(np.linalg.norm(ring.c2w[:, :3, 3], axis=-1), 1.5, rtol=1e-6)


def test_elevation_uniform_on_the_sphere():
  """sphere_prob 1: sin(elevation) is uniform over the range (threestudio's draw), so a band
  near the pole gets fewer cameras than uniform degrees would give it."""
  ranges = cameras.CameraRanges(elevation=(-10.0, 80.0), sphere_prob=1.0)
  e = np.asarray(cameras.sample(jax.random.key(0), ranges, 4096).elevation)
  assert e.min() >= -10.0 - 1e-3 and e.max() <= 80.0 + 1e-3
  lo, hi = np.sin(np.radians([-10.0, 80.0]))
  quarters = np.histogram(np.sin(np.radians(e)), bins=4, range=(lo, hi))[0] / len(e)
  np.testing.assert_allclose(quarters, 0.25, atol=0.03)
  top = (hi - np.sin(np.radians(57.5))) / (hi - lo)  # 0.12 of the draws above 57.5 degrees
  assert abs(np.mean(e > 57.5) - top) < 0.02
  # Half the cameras on the sphere: between the two.
  half = dataclasses.replace(ranges, sphere_prob=0.5)
  e = np.asarray(cameras.sample(jax.random.key(1), half, 4096).elevation)
  assert abs(np.mean(e > 57.5) - 0.5 * (top + 0.25)) < 0.02


def _angle(u, v):
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  c = np.sum(u * v, -1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
  return np.arccos(np.clip(c, -1.0, 1.0))


@pytest.mark.parametrize("height,width", [(5, 9), (7, 3)])
def test_rays_geometry(height, width):
  fovy = 50.0
  cam = cameras.from_spherical(1.4, 25.0, -60.0, fovy)
  origins, dirs = cameras.rays(cam.c2w, cam.fovy, height, width)
  assert origins.shape == dirs.shape == (height, width, 3)
  c2w = np.asarray(cam.c2w, np.float64)
  np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(origins, np.broadcast_to(c2w[:3, 3], dirs.shape), atol=1e-6)
  right, up, back = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2]
  ci, cj = height // 2, width // 2
  # Odd sizes: the centre pixel looks along the camera's -z.
  np.testing.assert_allclose(dirs[ci, cj], -back, atol=1e-6)
  # Row 0 is the top, column 0 the left.
  assert dirs[0, cj] @ up > 0 and dirs[-1, cj] @ up < 0
  assert dirs[ci, 0] @ right < 0 and dirs[ci, -1] @ right > 0
  # Pixel centres: the first and last row (column) centres span (H - 1) / H of
  # the vertical field of view's tangent, and the same focal length scales the
  # horizontal axis, so (W - 1) / H there.
  tan_half = math.tan(math.radians(fovy) / 2)
  vertical = 2 * math.atan((height - 1) / height * tan_half)
  horizontal = 2 * math.atan((width - 1) / height * tan_half)
  np.testing.assert_allclose(_angle(dirs[0, cj], dirs[-1, cj]), vertical, atol=1e-5)
  np.testing.assert_allclose(_angle(dirs[ci, 0], dirs[ci, -1]), horizontal, atol=1e-5)
  # Each corner ray makes the angle atan(hypot(tx, ty)) with the axis.
  tx = (width - 1) / height * tan_half
  ty = (height - 1) / height * tan_half
  corner = math.atan(math.hypot(tx, ty))
  for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    np.testing.assert_allclose(_angle(dirs[i, j], -back), corner, atol=1e-5)

  # A batch of cameras gives the per-camera rays.
  cams = cameras.from_spherical(1.4, 25.0, np.array([-60.0, 10.0]), np.array([50.0, 35.0]))
  _, batched = cameras.rays(cams.c2w, cams.fovy, height, width)
  _, second = cameras.rays(cams.c2w[1], cams.fovy[1], height, width)
  np.testing.assert_allclose(batched[0], dirs, atol=1e-6)
  np.testing.assert_allclose(batched[1], second, atol=1e-6)


def test_jit_and_vmap():
  elev = jnp.array([0.0, 30.0, 80.0])
  eager = cameras.from_spherical(1.2, elev, 15.0, 45.0)
  jitted = jax.jit(cameras.from_spherical)(1.2, elev, 15.0, 45.0)
  np.testing.assert_allclose(jitted.c2w, eager.c2w, atol=1e-6)
  f = jax.vmap(lambda c, fov: cameras.rays(c, fov, 3, 4)[1])
  _, want = cameras.rays(eager.c2w, eager.fovy, 3, 4)
  np.testing.assert_allclose(f(eager.c2w, eager.fovy), want, atol=1e-6)
  labels = jax.jit(cameras.view_label)(elev, jnp.zeros(3))
  np.testing.assert_array_equal(labels, [0, 0, 3])


def _label_reference(elevation, azimuth, front, back):
  if elevation > 60.0:
    return 3
  a = math.fmod(azimuth, 360.0)
  if a >= 180.0:
    a -= 360.0
  elif a < -180.0:
    a += 360.0
  if -front < a < front:
    return 0
  if a > 180.0 - back or a < -180.0 + back:
    return 2
  return 1


@pytest.mark.parametrize("front, back", [(30.0, 30.0), (45.0, 45.0), (20.0, 60.0)])
def test_view_label_thresholds(front, back):
  eps = 1e-3
  elev = [-30.0, 0.0, 60.0 - eps, 60.0, 60.0 + eps, 90.0]
  edges = [front, -front, 180.0 - back, -180.0 + back]
  azim = [x + d for x in edges for d in (-eps, 0.0, eps)]
  azim += [0.0, 90.0, 180.0, -180.0, 225.0, -315.0, 370.0, 719.0]
  e, a = np.meshgrid(np.array(elev, np.float32), np.array(azim, np.float32), indexing="ij")
  got = np.asarray(cameras.view_label(e, a, front, back))
  assert got.dtype == np.int32
  want = np.array(
    [
      [_label_reference(float(x), float(y), front, back) for y in row_a]
      for x, row_a in zip(e[:, 0], a)
    ]
  )
  np.testing.assert_array_equal(got, want)


def test_view_label_defaults():
  """threestudio's ProlificDreamer thresholds (30 degrees), written out by hand."""
  assert int(cameras.view_label(0.0, 29.9)) == 0
  assert int(cameras.view_label(0.0, 30.0)) == 1
  assert int(cameras.view_label(0.0, -150.1)) == 2
  assert int(cameras.view_label(0.0, 150.0)) == 1
  assert int(cameras.view_label(0.0, 180.0)) == 2
  assert int(cameras.view_label(60.0, 180.0)) == 2
  assert int(cameras.view_label(60.1, 0.0)) == 3
  assert int(cameras.view_label(10.0, 360.0)) == 0
  assert int(cameras.view_label(0.0, 40.0, front=45.0, back=45.0)) == 0
  for front, back in ((-1.0, 30.0), (30.0, 181.0), (100.0, 90.0)):
    with pytest.raises(ValueError, match="threshold"):
      cameras.view_label(0.0, 0.0, front, back)


def test_view_prompt():
  assert cameras.VIEW_NAMES == ("front", "side", "back", "overhead")
  assert cameras.view_prompt("a hamburger", 0) == "a hamburger, front view"
  assert cameras.view_prompt("a corgi", np.int32(3)) == "a corgi, overhead view"
  label = cameras.view_label(0.0, 180.0)
  assert cameras.view_prompt("x", label) == "x, back view"
  with pytest.raises(ValueError, match="label"):
    cameras.view_prompt("x", 4)
  with pytest.raises(ValueError, match="label"):
    cameras.view_prompt("x", 1.0)
  with pytest.raises(ValueError, match="prompt"):
    cameras.view_prompt(3, 1)


@pytest.mark.parametrize(
  "field,value",
  [
    ("radius", (1.5, 1.0)),
    ("radius", (0.0, 1.0)),
    ("radius", (1.0, float("inf"))),
    ("elevation", (50.0, 10.0)),
    ("elevation", (-95.0, 10.0)),
    ("elevation", (float("nan"), 10.0)),
    ("azimuth", (10.0, -10.0)),
    ("azimuth", (0.0,)),
    ("fovy", (0.0, 60.0)),
    ("fovy", (40.0, 180.0)),
    ("fovy", (70.0, 40.0)),
    ("sphere_prob", 1.5),
    ("sphere_prob", (0.5, 0.5)),
  ],
)
def test_camera_ranges_validation(field, value):
  with pytest.raises(ValueError, match=f"CameraRanges.{field}"):
    cameras.CameraRanges(**{field: value})


def test_camera_ranges_hashable():
  a = cameras.CameraRanges(radius=[1, 2])
  assert a == cameras.CameraRanges(radius=(1.0, 2.0))
  assert hash(a) == hash(cameras.CameraRanges(radius=(1.0, 2.0)))


def test_bad_inputs_raise():
  nan = float("nan")
  with pytest.raises(ValueError, match="elevation"):
    cameras.from_spherical(1.0, nan, 0.0, 50.0)
  with pytest.raises(ValueError, match="azimuth"):
    cameras.from_spherical(1.0, 0.0, np.array([0.0, np.inf]), 50.0)
  with pytest.raises(ValueError, match="radius"):
    cameras.from_spherical(-1.0, 0.0, 0.0, 50.0)
  with pytest.raises(ValueError, match="fovy"):
    cameras.from_spherical(1.0, 0.0, 0.0, 180.0)
  with pytest.raises(ValueError, match="broadcast"):
    cameras.from_spherical(np.ones(2), np.zeros(3), 0.0, 50.0)
  c2w = np.asarray(cameras.from_spherical(1.0, 0.0, 0.0, 50.0).c2w)
  with pytest.raises(ValueError, match="c2w"):
    cameras.rays(c2w[:3], 50.0, 4, 4)
  bad = c2w.copy()
  bad[0, 3] = np.nan
  with pytest.raises(ValueError, match="c2w"):
    cameras.rays(bad, 50.0, 4, 4)
  with pytest.raises(ValueError, match="fovy"):
    cameras.rays(c2w, np.nan, 4, 4)
  with pytest.raises(ValueError, match="fovy"):
    cameras.rays(np.stack([c2w] * 3), np.full(2, 50.0), 4, 4)
  with pytest.raises(ValueError, match="height"):
    cameras.rays(c2w, 50.0, 0, 4)
  with pytest.raises(ValueError, match="width"):
    cameras.rays(c2w, 50.0, 4, 2.5)
  with pytest.raises(ValueError, match="eye"):
    cameras.look_at([np.nan, 0.0, 0.0], [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="eye and target"):
    cameras.look_at([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="target"):
    cameras.look_at([1.0, 0.0, 0.0], [0.0, 0.0])
  with pytest.raises(ValueError, match="n"):
    cameras.sample(jax.random.key(0), cameras.CameraRanges(), 0)
  with pytest.raises(ValueError, match="ranges"):
    cameras.sample(jax.random.key(0), {"radius": (1, 2)}, 4)
  with pytest.raises(ValueError, match="n_views"):
    cameras.orbit(0, 1.0, 0.0, 50.0)
  with pytest.raises(ValueError, match="elevation"):
    cameras.view_label(np.nan, 0.0)
