"""Tests for vsdjax.shapes against closed forms and brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import cameras
from vsdjax.prior.analytic import shapes

D = shapes.DIMS


# ----------------------------------------------------------------------------
# Independent numpy references.


def _inside(shape, p):
  """[N] bool: p [N, 3] strictly inside the shape (closed-form inequalities)."""
  x, y, z = p[:, 0], p[:, 1], p[:, 2]
  rho = np.hypot(x, y)
  if shape == "sphere":
    return np.linalg.norm(p, axis=1) < D.sphere_radius
  if shape == "cube":
    return np.all(np.abs(p) < D.cube_half, axis=1)
  if shape == "torus":
    return (rho - D.torus_major) ** 2 + z**2 < D.torus_minor**2
  if shape == "cylinder":
    return (rho < D.cylinder_radius) & (np.abs(z) < D.cylinder_half_height)
  h = D.cone_half_height
  return (z > -h) & (z < h) & (rho < D.cone_radius * (h - z) / (2 * h))


def _nearest_distance(shape, p):
  """[N] unsigned distance from p [N, 3] to the shape's surface, brute force.

  The cube uses the closest point of the box (clip outside, nearest face
  inside); the solids of revolution the distance, in the meridian half-plane
  (rho, z), to their densely sampled profile curve.
  """
  if shape == "cube":
    b = D.cube_half
    outside = np.linalg.norm(p - np.clip(p, -b, b), axis=1)
    return np.where(_inside(shape, p), np.min(b - np.abs(p), axis=1), outside)
  s = np.linspace(0.0, 1.0, 20001)  # Profile spacing < 1e-4.
  seg = lambda a, b: np.stack(  # pylint: disable=g-long-lambda
    [a[0] + s * (b[0] - a[0]), a[1] + s * (b[1] - a[1])], -1
  )
  if shape == "sphere":
    v = np.pi * s
    curve = D.sphere_radius * np.stack([np.sin(v), np.cos(v)], -1)
  elif shape == "torus":
    v = 2 * np.pi * s
    curve = np.stack([D.torus_major + D.torus_minor * np.cos(v), D.torus_minor * np.sin(v)], -1)
  elif shape == "cylinder":
    r, h = D.cylinder_radius, D.cylinder_half_height
    curve = np.concatenate([seg((0, h), (r, h)), seg((r, h), (r, -h)), seg((r, -h), (0, -h))])
  else:
    r, h = D.cone_radius, D.cone_half_height
    curve = np.concatenate([seg((0, h), (r, -h)), seg((r, -h), (0, -h))])
  q = np.stack([np.hypot(p[:, 0], p[:, 1]), p[:, 2]], -1)  # [N, 2]
  return np.array([np.min(np.linalg.norm(curve - x, axis=1)) for x in q])


def _look_at_rays(eye, fovy_deg, size):
  """Pinhole rays [size, size, 3] (pixel centres) of a camera at eye -> 0."""
  eye = np.asarray(eye, np.float64)
  fwd = -eye / np.linalg.norm(eye)
  right = np.cross(fwd, [0.0, 0.0, 1.0])
  right /= np.linalg.norm(right)
  up = np.cross(right, fwd)
  focal = 0.5 * size / np.tan(np.deg2rad(fovy_deg) / 2)
  c = (np.arange(size) + 0.5 - size / 2) / focal  # [S]
  d = c[None, :, None] * right - c[:, None, None] * up + fwd  # [S, S, 3]
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  return np.broadcast_to(eye, d.shape), d


def _boundary(mask):
  """[H, W] bool: pixels with a 4-neighbour of the other value."""
  m = np.pad(mask, 1, mode="edge")
  c = m[1:-1, 1:-1]
  return (c != m[:-2, 1:-1]) | (c != m[2:, 1:-1]) | (c != m[1:-1, :-2]) | (c != m[1:-1, 2:])


# ----------------------------------------------------------------------------
# SDFs.


def test_sdf_closed_form_points():
  b, r_cyl, h_cyl = D.cube_half, D.cylinder_radius, D.cylinder_half_height
  cases = {
    "sphere": [
      ((0, 0, 0), -D.sphere_radius),
      ((0, 2, 0), 2 - D.sphere_radius),
      ((0.6, 0, 0.8), 1 - D.sphere_radius),
    ],
    "cube": [
      ((0, 0, 0), -b),
      ((1, 0, 0), 1 - b),
      ((0, 0, -0.7), 0.7 - b),
      ((0.1, 0, 0), -(b - 0.1)),
      ((1, 1, 1), np.sqrt(3) * (1 - b)),
      ((1, -1, 0.1), np.sqrt(2) * (1 - b)),
    ],
    "torus": [
      ((0, 0, 0), D.torus_major - D.torus_minor),  # Ring centre.
      ((D.torus_major, 0, 0), -D.torus_minor),  # Tube centre.
      ((0, -D.torus_major, 0.5), 0.5 - D.torus_minor),
      ((0, 0, 1), np.hypot(D.torus_major, 1) - D.torus_minor),
    ],
    "cylinder": [
      ((0, 0, 0), -r_cyl),
      ((0, 0, 1), 1 - h_cyl),
      ((0, 1, 0), 1 - r_cyl),
      ((1, 0, 1), np.hypot(1 - r_cyl, 1 - h_cyl)),
    ],
    "cone": [
      ((0, 0, 1), 1 - D.cone_half_height),  # Above the apex.
      ((0, 0, -1), 1 - D.cone_half_height),  # Below the base.
      ((0, 0, -0.3), -(D.cone_half_height - 0.3)),  # Near the base.
      ((1, 0, -D.cone_half_height), 1 - D.cone_radius),
    ],
  }
  assert set(cases) == set(shapes.SHAPES)
  for shape, points in cases.items():
    p = np.array([q for q, _ in points], np.float32)
    want = np.array([d for _, d in points])
    np.testing.assert_allclose(shapes.sdf(shape, p), want, atol=1e-5, err_msg=shape)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_sdf_matches_brute_force_distance(shape):
  rng = np.random.default_rng(0)
  p = rng.uniform(-0.7, 0.7, (300, 3))
  p[:100] *= 0.6  # More points inside and near the surface.
  inside = _inside(shape, p)
  assert 10 < inside.sum() < 290
  want = np.where(inside, -1.0, 1.0) * _nearest_distance(shape, p)
  got = np.asarray(shapes.sdf(shape, p.astype(np.float32)))
  np.testing.assert_allclose(got, want, atol=1e-5, err_msg=shape)
  # Every shape fits in the bounding ball and is not thin.
  corners = {
    "sphere": [0, 0, D.sphere_radius],
    "cube": [D.cube_half] * 3,
    "torus": [D.torus_major + D.torus_minor, 0, 0],
    "cylinder": [D.cylinder_radius, 0, D.cylinder_half_height],
    "cone": [D.cone_radius, 0, -D.cone_half_height],
  }
  assert np.linalg.norm(corners[shape]) <= shapes.BOUND_RADIUS
  assert abs(float(shapes.sdf(shape, np.array(corners[shape])))) < 1e-6
  deepest = {
    "torus": [D.torus_major, 0, 0],
    "cone": [0, 0, 0.209 - D.cone_half_height],
  }  # Inscribed ball.
  assert float(shapes.sdf(shape, np.array(deepest.get(shape, [0, 0, 0])))) <= -0.12


def test_sdf_errors():
  with pytest.raises(ValueError, match="known shapes: sphere, cube"):
    shapes.sdf("pyramid", np.zeros(3))
  with pytest.raises(ValueError, match="p: expected shape"):
    shapes.sdf("sphere", np.zeros((4, 2)))


# ----------------------------------------------------------------------------
# Rendering.


def test_render_sphere_matches_analytic():
  size, eye = 33, np.array([0.9, -1.0, 0.5])
  light = np.array([1.0, 1.0, 0.2]) / np.linalg.norm([1.0, 1.0, 0.2])
  color, background, ambient = (0.8, 0.5, 0.2), (0.1, 0.2, 0.3), 0.25
  o, d = _look_at_rays(eye, 45.0, size)
  out = shapes.render(
    shapes.Reference("sphere", color), o, d, background=background, light_dir=light, ambient=ambient
  )
  rgb, mask, depth = (np.asarray(out[k]) for k in ("rgb", "mask", "depth"))
  assert rgb.shape == (size, size, 3) and mask.shape == depth.shape == (size, size)

  # Analytic ray-sphere intersection, pixel by pixel.
  want_mask = np.zeros((size, size), bool)
  want_t = np.zeros((size, size))
  for i in range(size):
    for j in range(size):
      b = np.dot(o[i, j], d[i, j])
      disc = b * b - (np.dot(o[i, j], o[i, j]) - D.sphere_radius**2)
      if disc > 0:
        want_mask[i, j] = True
        want_t[i, j] = -b - np.sqrt(disc)
  border = _boundary(want_mask)
  assert want_mask.sum() > 200 and (~want_mask).sum() > 200
  np.testing.assert_array_equal(mask[~border], want_mask[~border])
  assert set(np.unique(mask)) <= {0.0, 1.0}

  inner = want_mask & ~border
  np.testing.assert_allclose(depth[inner], want_t[inner], atol=1e-4)
  assert np.all(depth[mask == 0] == 0)

  # Lambertian shading with the analytic normal x / r.
  normal = (o + want_t[..., None] * d) / D.sphere_radius  # [S, S, 3]
  lam = np.maximum(normal @ light, 0.0)
  want_rgb = np.array(color) * (ambient + (1 - ambient) * lam[..., None])
  np.testing.assert_allclose(rgb[inner], want_rgb[inner], atol=2e-4)
  assert np.any(lam[inner] == 0) and np.any(lam[inner] > 0.5)  # Both regimes.
  c = size // 2
  np.testing.assert_allclose(rgb[c, c], want_rgb[c, c], atol=1e-5)
  np.testing.assert_array_equal(
    rgb[mask == 0], np.broadcast_to(background, rgb[mask == 0].shape).astype(np.float32)
  )


def test_render_cube_front_face_and_ref_axis():
  size, dist = 33, 1.5  # Sphere and settings as above: no new compile.
  o, d = _look_at_rays([0.0, -dist, 0.0], 40.0, size)
  light = (0.0, -1.0, 0.0)
  refs = (shapes.parse_references("cube:#4080c0")[0], shapes.Reference("sphere", (0.8, 0.5, 0.2)))
  out = shapes.render(refs, o, d, light_dir=light, ambient=0.25)
  assert out["rgb"].shape == (2, size, size, 3)
  assert out["mask"].shape == out["depth"].shape == (2, size, size)
  # The front face y = -b: hit at t = (dist - b) / d_y where |x|, |z| < b.
  b = D.cube_half
  t = (dist - b) / d[..., 1]
  x = o + t[..., None] * d
  face = np.all(np.abs(x[..., [0, 2]]) < b - 0.02, axis=-1)
  assert face.sum() > 20
  np.testing.assert_allclose(out["depth"][0][face], t[face], atol=1e-4)
  # Normal (0, -1, 0) faces the light: full albedo.
  np.testing.assert_allclose(
    out["rgb"][0][face], np.broadcast_to(refs[0].color, (face.sum(), 3)), atol=1e-5
  )
  # The stacked render equals one render per reference.
  single = shapes.render(refs[1], o, d, light_dir=light, ambient=0.25)
  for k in out:
    np.testing.assert_array_equal(out[k][1], single[k])


def test_render_views_jit_vmap_consistent():
  refs = shapes.parse_references("cone,torus")
  cams = cameras.from_spherical(
    1.5, jnp.array([30.0, -10.0, 30.0]), jnp.array([20.0, 135.0, 20.0]), 50.0
  )
  size = 24
  render = jax.jit(lambda c2w, fovy: shapes.render_views(refs, c2w, fovy, size, size))
  out = render(cams.c2w, cams.fovy)
  assert out["rgb"].shape == (3, 2, size, size, 3)
  assert out["mask"].shape == out["depth"].shape == (3, 2, size, size)
  rgb, mask = np.asarray(out["rgb"]), np.asarray(out["mask"])
  assert np.all(np.isfinite(rgb)) and np.all(np.isfinite(out["depth"]))
  np.testing.assert_array_equal(rgb[0], rgb[2])  # Same camera, same image.
  assert np.abs(rgb[0] - rgb[1]).max() > 0.1
  # Each shape is seen whole: hits in the image, none on its border.
  assert np.all(mask.sum(axis=(-1, -2)) > 20)
  edge = np.ones((size, size), bool)
  edge[1:-1, 1:-1] = False
  assert np.all(mask[..., edge] == 0)
  # An eager render of one camera's rays agrees with render_views.
  o, d = cameras.rays(cams.c2w[1], 50.0, size, size)  # [S, S, 3]
  eager = shapes.render(refs[1], o, d)
  for k in out:
    np.testing.assert_allclose(eager[k], out[k][1, 1], atol=1e-5)


def test_render_views_supersample_is_box_filter():
  ref = shapes.Reference("torus", (0.2, 0.7, 0.3))
  cam = cameras.from_spherical(1.2, 40.0, -30.0, 60.0)
  low = shapes.render_views(ref, cam.c2w, cam.fovy, 6, 8, supersample=2)
  high = shapes.render_views(ref, cam.c2w, cam.fovy, 12, 16)
  assert low["rgb"].shape == (6, 8, 3) and low["mask"].shape == (6, 8)
  # Box-average 2x2 blocks of the high-resolution render by explicit loops.
  for i in range(6):
    for j in range(8):
      block = (slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2))
      np.testing.assert_allclose(
        low["rgb"][i, j], np.mean(high["rgb"][block], axis=(0, 1)), atol=1e-5
      )
      hits = np.asarray(high["mask"][block])
      np.testing.assert_allclose(low["mask"][i, j], hits.mean())
      want = (np.sum(high["depth"][block]) / hits.sum()) if hits.sum() else 0.0
      np.testing.assert_allclose(low["depth"][i, j], want, rtol=1e-5)
  assert 0 < float(low["mask"].sum()) and np.any((low["mask"] > 0) & (low["mask"] < 1))
  # Re-compositing onto another background is exact with supersampling.
  other = np.array([0.2, 0.5, 0.1], np.float32)
  want = low["rgb"] + (1 - low["mask"])[..., None] * (other - 1.0)
  got = shapes.render_views(ref, cam.c2w, cam.fovy, 6, 8, supersample=2, background=other)
  np.testing.assert_allclose(got["rgb"], want, atol=1e-6)


# ----------------------------------------------------------------------------
# Reference strings.


def test_parse_references():
  refs = shapes.parse_references("sphere:#d04040,cube:#3060C0")
  assert refs == (
    shapes.Reference("sphere", (208 / 255, 64 / 255, 64 / 255)),
    shapes.Reference("cube", (48 / 255, 96 / 255, 192 / 255)),
  )
  refs = shapes.parse_references("  torus ,cone : #000000\t, sphere:#ffffff ")
  assert [r.shape for r in refs] == ["torus", "cone", "sphere"]
  assert refs[1].color == (0.0, 0.0, 0.0) and refs[2].color == (1.0, 1.0, 1.0)
  default = shapes.DEFAULT_COLORS["torus"]
  assert refs[0].color == tuple(int(default[i : i + 2], 16) / 255 for i in (1, 3, 5))
  # Every shape parses with its default colour, distinct from a white scene.
  refs = shapes.parse_references(",".join(shapes.SHAPES))
  assert len({r.color for r in refs}) == len(shapes.SHAPES)
  assert all(max(r.color) < 0.9 for r in refs)


@pytest.mark.parametrize(
  "text, match",
  [
    ("", "empty"),
    ("   ", "empty"),
    ("sphere,,cube", "empty item"),
    ("sphere,", "empty item"),
    (
      "sphere,pyramid:#ff0000",
      "unknown shape 'pyramid'.*known shapes: sphere, cube, torus, cylinder, cone",
    ),
    ("cube:#12345", "bad colour '#12345' in item 'cube:#12345'.*#rrggbb"),
    ("cube:red", "bad colour 'red'.*#rrggbb"),
    ("cube:", "bad colour ''"),
    ("cube:#gg0000", "bad colour"),
  ],
)
def test_parse_references_errors(text, match):
  with pytest.raises(ValueError, match=match):
    shapes.parse_references(text)


def test_component_names_by_colour():
  names = [shapes.component_name(r) for r in shapes.parse_references(",".join(shapes.SHAPES))]
  assert names == ["red sphere", "blue cube", "green torus", "yellow cylinder", "purple cone"]
  expected = {
    "#ffffff": "white",
    "#808080": "grey",
    "#101010": "black",
    "#ff8000": "orange",
    "#20c0c0": "cyan",
    "#ff4040": "red",
    "#e04060": "red",
    "#e040a0": "pink",
  }
  for hex_colour, name in expected.items():
    assert shapes.colour_name(shapes._hex_to_rgb(hex_colour)) == name, hex_colour
