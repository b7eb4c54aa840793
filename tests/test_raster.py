"""Tests for vsdjax.representations.mesh.raster against references written here.

Visibility is checked against numpy ray-triangle intersection (float64,
Moller-Trumbore) along the rays of vsdjax.cameras.rays, and the tiled
rasterizer against its own single-tile (brute-force) configuration.
Antialiasing is checked against 8 x 8 supersampling, and gradients against
central finite differences in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import cameras
from vsdjax.representations.mesh import raster

# Every face is a candidate of every pixel: one tile over the whole image.
_BRUTE_TILE = 64


def _icosphere(subdivisions: int, radius: float = 1.0):
  """Unit icosahedron subdivided `subdivisions` times, outward faces."""
  g = (1.0 + 5.0**0.5) / 2.0
  verts = [
    [-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0], [0, -1, g], [0, 1, g],
    [0, -1, -g], [0, 1, -g], [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1],
  ]  # fmt: skip
  faces = [
    [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
    [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
    [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
  ]  # fmt: skip
  verts = [np.array(v, float) / np.linalg.norm(v) for v in verts]
  for _ in range(subdivisions):
    middle = {}

    def mid(a, b):
      key = (min(a, b), max(a, b))
      if key not in middle:
        m = verts[a] + verts[b]
        verts.append(m / np.linalg.norm(m))
        middle[key] = len(verts) - 1
      return middle[key]

    new = []
    for a, b, c in faces:
      ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
      new += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
    faces = new
  return radius * np.array(verts), _outward(np.array(verts), np.array(faces))


def _outward(verts, faces):
  """Faces of a convex mesh around the origin, ordered counter-clockwise from outside."""
  v = verts[faces]  # [F, 3, 3]
  normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
  flip = np.einsum("fk,fk->f", normal, v.mean(1)) < 0
  return np.where(flip[:, None], faces[:, ::-1], faces).astype(np.int32)


def _cube(half: float):
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
  quads = [[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]]
  faces = np.array([t for a, b, c, d in quads for t in ([a, b, c], [a, c, d])])
  return half * corners, _outward(corners, faces)


def _soup(rng, n: int):
  """n random triangles around the origin, sizes from 0.02 to 1.5 world units."""
  centre = rng.uniform(-1.0, 1.0, (n, 1, 3))
  size = np.exp(rng.uniform(np.log(0.02), np.log(1.5), (n, 1, 1)))
  verts = (centre + size * rng.normal(size=(n, 3, 3))).reshape(-1, 3)
  return verts, np.arange(3 * n, dtype=np.int32).reshape(n, 3)


def _reference(verts, faces, cam, height, width):
  """Nearest hit per pixel centre by ray-triangle intersection (float64).

  Returns tri [H, W] (-1: none), depth along the viewing axis [H, W], the
  barycentrics [H, W, 3] and the hit points [H, W, 3].
  """
  o, d = cameras.rays(cam.c2w, cam.fovy, height, width)
  o = np.asarray(o, np.float64).reshape(-1, 3)
  d = np.asarray(d, np.float64).reshape(-1, 3)
  d /= np.linalg.norm(d, axis=-1, keepdims=True)
  tri = verts[faces].astype(np.float64)  # [F, 3, 3]
  e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]  # [F, 3]
  ids, ts, uvs = [], [], []
  for rows in np.array_split(np.arange(len(o)), max(1, len(o) * len(faces) // 200_000)):
    p = np.cross(d[rows, None], e2[None])  # [R, F, 3]
    det = np.einsum("rfk,fk->rf", p, e1)
    inv = 1.0 / np.where(det == 0, 1.0, det)
    s = o[rows, None] - tri[None, :, 0]  # [R, F, 3]
    u = np.einsum("rfk,rfk->rf", s, p) * inv
    q = np.cross(s, e1[None])
    v = np.einsum("rk,rfk->rf", d[rows], q) * inv
    t = np.einsum("fk,rfk->rf", e2, q) * inv
    hit = (det != 0) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    t = np.where(hit, t, np.inf)
    best = np.argmin(t, axis=1)
    r = np.arange(len(rows))
    ids.append(np.where(np.isfinite(t[r, best]), best, -1))
    ts.append(t[r, best])
    uvs.append(np.stack([u[r, best], v[r, best]], -1))
  ids, t, uv = np.concatenate(ids), np.concatenate(ts), np.concatenate(uvs)
  forward = -np.asarray(cam.c2w, np.float64)[:3, 2]
  depth = np.where(ids >= 0, t * (d @ forward), 0.0)
  bary = np.stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], -1)
  points = o + np.where(ids >= 0, t, 0.0)[:, None] * d
  shape = (height, width)
  return (
    ids.reshape(shape),
    depth.reshape(shape),
    bary.reshape(shape + (3,)),
    points.reshape(shape + (3,)),
  )


def _edge_pixels(ids):
  """[H, W] bool: pixels whose id differs from a 4-neighbour's."""
  edge = np.zeros(ids.shape, bool)
  diff_x, diff_y = ids[:, 1:] != ids[:, :-1], ids[1:] != ids[:-1]
  edge[:, 1:] |= diff_x
  edge[:, :-1] |= diff_x
  edge[1:] |= diff_y
  edge[:-1] |= diff_y
  return edge


def _check_against_reference(verts, faces, cam, height, width, **kwargs):
  """Rasterizes and compares with `_reference`; returns the Raster."""
  clip = raster.project(verts, cam.c2w, cam.fovy, aspect=width / height)
  mask = np.ones(len(faces), bool)
  r = raster.rasterize(clip, faces, mask, height, width, **kwargs)
  ref_ids, ref_depth, ref_bary, ref_points = _reference(verts, faces, cam, height, width)
  ids = np.asarray(r.tri_id)
  assert int(r.overflow) == 0 and int(r.dropped) == 0
  assert (ref_ids >= 0).mean() > 0.2  # the scene fills the image
  mismatch = ids != ref_ids
  assert not np.any(mismatch & ~_edge_pixels(ref_ids)), np.argwhere(mismatch)
  assert mismatch.mean() < 0.01
  same = ~mismatch & (ids >= 0)
  np.testing.assert_allclose(np.asarray(r.depth)[same], ref_depth[same], rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(r.depth)[ids < 0], 0.0)
  bary = np.asarray(raster.barycentrics(clip, faces, r.tri_id, height, width))
  np.testing.assert_allclose(bary[same], ref_bary[same], atol=2e-3)
  np.testing.assert_array_equal(bary[ids < 0], 0.0)
  points = np.asarray(raster.interpolate(verts, faces, r.tri_id, bary))
  np.testing.assert_allclose(points[same], ref_points[same], atol=2e-4)
  return r


def test_project_matches_camera_rays():
  cam = cameras.from_spherical(2.5, 20.0, -40.0, 55.0)
  height, width = 12, 20
  o, d = cameras.rays(cam.c2w, cam.fovy, height, width)
  t = np.linspace(0.5, 4.0, height * width).reshape(height, width, 1)
  points = np.asarray(o + t * d).reshape(-1, 3)
  clip = np.asarray(raster.project(points, cam.c2w, cam.fovy, aspect=width / height))
  u = (clip[:, 0] / clip[:, 3] + 1.0) * width / 2.0
  v = (1.0 - clip[:, 1] / clip[:, 3]) * height / 2.0
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  np.testing.assert_allclose(u, cols.reshape(-1) + 0.5, atol=1e-4)
  np.testing.assert_allclose(v, rows.reshape(-1) + 0.5, atol=1e-4)
  forward = -np.asarray(cam.c2w)[:3, 2]
  np.testing.assert_allclose(clip[:, 3], (points - np.asarray(o)[0, 0]) @ forward, rtol=1e-5)
  # Z / W runs from -1 at the near plane to 1 at the far plane.
  near = raster.project(np.asarray(o)[0, :1] + 0.5 * forward, cam.c2w, cam.fovy, near=0.5)
  np.testing.assert_allclose(near[0, 2] / near[0, 3], -1.0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_visibility_random_soup(seed):
  rng = np.random.default_rng(seed)
  verts, faces = _soup(rng, 150)
  cam = cameras.from_spherical(3.5, rng.uniform(-30, 30), rng.uniform(-180, 180), 50.0)
  # Default levels, and small ones that send most faces to the whole-image tile.
  _check_against_reference(verts, faces, cam, 48, 64)
  r = _check_against_reference(verts, faces, cam, 48, 64, levels=((2, 64), (4, 64)), large=200)
  assert r.fill[-1] > 50


def test_visibility_closed_meshes():
  cam = cameras.from_spherical(3.0, 25.0, 30.0, 40.0)
  for verts, faces in (_icosphere(3, 0.9), _cube(0.6)):
    r = _check_against_reference(verts, faces, cam, 64, 64)
    # Outward faces: back faces are never visible on a closed convex mesh.
    clip = raster.project(verts, cam.c2w, cam.fovy)
    mask = np.ones(len(faces), bool)
    culled = raster.rasterize(clip, faces, mask, 64, 64, cull_back=True)
    np.testing.assert_array_equal(culled.tri_id, r.tri_id)
    assert np.all(culled.fill <= r.fill) and culled.fill.max() < r.fill.max()


def test_masked_and_near_plane_faces_are_culled():
  verts, faces = _icosphere(2, 0.9)
  cam = cameras.from_spherical(3.0, 0.0, 0.0, 40.0)
  clip = raster.project(verts, cam.c2w, cam.fovy)
  full = np.asarray(raster.rasterize(clip, faces, np.ones(len(faces), bool), 32, 32).tri_id)
  mask = np.arange(len(faces)) % 3 != 0
  ids = np.asarray(raster.rasterize(clip, faces, mask, 32, 32).tri_id)
  assert not np.any(np.isin(ids, np.flatnonzero(~mask)))
  assert np.all((ids == full) | ~mask[full] | (full < 0))
  # The near plane at distance 2.5 cuts the sphere's front (it reaches 2.1).
  near = raster.project(verts, cam.c2w, cam.fovy, near=2.5)
  ids = np.asarray(raster.rasterize(near, faces, np.ones(len(faces), bool), 32, 32).tri_id)
  depth = np.asarray(clip)[:, 3]
  in_front = np.any(depth[faces] < 2.5, axis=1)
  assert in_front.sum() > 10 and not np.any(np.isin(ids, np.flatnonzero(in_front)))
  assert np.sum(ids >= 0) > 100  # faces behind the cut stay visible


def test_tiles_match_brute_force_and_report_overflow():
  rng = np.random.default_rng(3)
  verts, faces = _soup(rng, 300)
  cam = cameras.from_spherical(3.5, 10.0, 70.0, 50.0)
  clip = raster.project(verts, cam.c2w, cam.fovy)
  mask = rng.uniform(size=len(faces)) < 0.9
  n = len(faces)
  brute = raster.rasterize(clip, faces, mask, 48, 48, levels=((_BRUTE_TILE, n),), large=1)
  tiled = raster.rasterize(clip, faces, mask, 48, 48)
  assert int(brute.overflow) == 0 and int(tiled.overflow) == 0 and int(tiled.dropped) == 0
  assert np.all(
    np.asarray(tiled.fill) <= [k for _, k in raster.DEFAULT_LEVELS] + [raster.DEFAULT_LARGE]
  )
  np.testing.assert_array_equal(tiled.tri_id, brute.tri_id)
  np.testing.assert_array_equal(tiled.depth, brute.depth)
  assert np.mean(np.asarray(brute.tri_id) >= 0) > 0.3
  # Too few candidates: every overfull tile is counted and the result changes.
  small = raster.rasterize(clip, faces, mask, 48, 48, levels=((4, 2), (16, 2)), large=2)
  fill = np.asarray(small.fill)
  assert np.any(fill > 2) and int(small.overflow) > 0
  assert int(small.dropped) >= int(small.overflow) and int(small.dropped) >= fill.max() - 2
  assert np.any(np.asarray(small.tri_id) != np.asarray(brute.tri_id))


def test_antialias_coverage_and_silhouette_gradient():
  # One triangle facing the camera (at +x, looking at the origin; right = +y,
  # up = +z); the hard mask has no gradient, so all of it comes from antialias.
  height = width = 48
  with jax.enable_x64(True):
    cam = cameras.from_spherical(2.0, 0.0, 0.0, 40.0)
    tri = np.array([[0.0, -0.35, -0.3], [0.0, 0.05, 0.42], [0.0, 0.3, -0.1]])
    faces, mask = np.array([[0, 1, 2]], np.int32), np.ones(1, bool)
    u_centre = np.arange(width) + 0.5
    weight = np.broadcast_to(u_centre, (height, width))

    def coverage(v, smooth=True):
      clip = raster.project(v, cam.c2w, cam.fovy)
      r = raster.rasterize(clip, faces, mask, height, width)
      hard = (r.tri_id >= 0)[..., None].astype(v.dtype)
      return raster.antialias(hard, clip, faces, mask, r.tri_id)[..., 0] if smooth else hard[..., 0]

    def loss(s, smooth=True):
      return jnp.sum(coverage(tri + s * np.array([0.0, 1.0, 0.0]), smooth) * weight)

    clip = np.asarray(raster.project(tri, cam.c2w, cam.fovy))
    uv = np.stack(
      [(clip[:, 0] / clip[:, 3] + 1) * width / 2, (1 - clip[:, 1] / clip[:, 3]) * height / 2], -1
    )
    e1, e2 = uv[1] - uv[0], uv[2] - uv[0]
    area = 0.5 * abs(e1[0] * e2[1] - e1[1] * e2[0])  # pixels
    soft = float(jnp.sum(coverage(tri)))
    hard = float(jnp.sum(coverage(tri, False)))
    assert abs(soft - area) < 0.2 * abs(hard - area) and abs(soft - area) < 0.01 * area

    grad = float(jax.grad(loss)(0.0))
    assert float(jax.grad(lambda s: loss(s, False))(0.0)) == 0.0
    h = 1e-6
    fd = (float(loss(h)) - float(loss(-h))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5)
    # Moving sideways by s moves the image by s * focal / depth pixels, so
    # d/ds sum(coverage * u) = area * focal / depth, up to the 1D box
    # filter's error near the vertices (5% at this size, 1% at 192 x 192).
    focal = 0.5 * height / np.tan(np.deg2rad(20.0))
    np.testing.assert_allclose(grad, area * focal / 2.0, rtol=0.1)


def test_gradients_match_finite_differences():
  height = width = 32
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    verts, faces = _icosphere(1, 0.6)
    verts = verts * (1.0 + 0.15 * rng.uniform(-1, 1, (len(verts), 1)))
    verts = np.concatenate([verts, verts[:3] * 1.6 + [0.0, 0.0, 0.5]])  # a floating triangle
    faces = np.concatenate([faces, [[len(verts) - 3, len(verts) - 2, len(verts) - 1]]])
    mask = np.ones(len(faces), bool)
    colors = rng.uniform(size=(len(verts), 3))
    weight = rng.normal(size=(height, width, 3))
    cam = cameras.from_spherical(2.2, 20.0, 35.0, 45.0)

    def loss(v, smooth=True):
      clip = raster.project(v, cam.c2w, cam.fovy)
      r = raster.rasterize(clip, faces, mask, height, width)
      bary = raster.barycentrics(clip, faces, r.tri_id, height, width)
      img = raster.interpolate(colors, faces, r.tri_id, bary) + 0.3 * (r.tri_id < 0)[..., None]
      if smooth:
        img = raster.antialias(img, clip, faces, mask, r.tri_id)
      return jnp.sum(img * weight)

    loss_fn = jax.jit(loss, static_argnums=1)
    grads = {}
    for smooth in (False, True):
      grad = grads[smooth] = np.asarray(jax.grad(loss_fn)(verts, smooth))
      assert np.all(np.isfinite(grad))
      for _ in range(3):
        d = rng.normal(size=verts.shape)
        h = 1e-6
        fd = (float(loss_fn(verts + h * d, smooth)) - float(loss_fn(verts - h * d, smooth))) / (
          2 * h
        )
        np.testing.assert_allclose(np.sum(grad * d), fd, rtol=1e-5, atol=1e-6 * np.abs(grad).sum())
    # Antialiasing adds gradients at the silhouette vertices.
    change = np.abs(grads[True] - grads[False]).max()
    assert change > 0.1 * np.abs(grads[False]).max()


def test_edge_neighbours():
  faces = np.array(
    [
      [0, 1, 2],  # shares (0, 1) with face 1 and (2, 0) with the masked face 5
      [1, 0, 3],
      [4, 5, 6],  # faces 2, 3, 4 share (4, 5): non-manifold
      [5, 4, 7],
      [4, 5, 8],
      [0, 2, 9],
    ],
    np.int32,
  )
  mask = np.array([True, True, True, True, True, False])
  nb = np.asarray(raster._edge_neighbours(jnp.asarray(faces), jnp.asarray(mask)))
  # Edge e joins vertices (e + 1, e + 2) mod 3; half-edge ids are 3 f + e.
  assert nb[0].tolist() == [-1, -1, 3 * 1 + 2] and nb[1].tolist() == [-1, -1, 3 * 0 + 2]
  assert np.all(nb[2:] == -1)


def test_vmap_and_jit_over_particles():
  height = width = 32
  verts, faces = _icosphere(2, 0.7)
  rng = np.random.default_rng(5)
  batch_verts = np.stack([verts, verts * (1.0 + 0.2 * rng.uniform(-1, 1, (len(verts), 1)))])
  masks = np.stack([np.ones(len(faces), bool), rng.uniform(size=len(faces)) < 0.8])
  colors = rng.uniform(size=(2, len(verts), 3))
  cams = cameras.from_spherical(
    np.array([2.0, 2.5]), np.array([10.0, 40.0]), np.array([0.0, 120.0]), 45.0
  )

  def render(v, c2w, fovy, mask, color):
    clip = raster.project(v, c2w, fovy)
    r = raster.rasterize(clip, faces, mask, height, width)
    bary = raster.barycentrics(clip, faces, r.tri_id, height, width)
    img = raster.interpolate(color, faces, r.tri_id, bary)
    return r.tri_id, raster.antialias(img, clip, faces, mask, r.tri_id), r.overflow

  ids, imgs, overflow = jax.jit(jax.vmap(render))(batch_verts, cams.c2w, cams.fovy, masks, colors)
  assert ids.shape == (2, height, width) and imgs.shape == (2, height, width, 3)
  assert overflow.shape == (2,) and np.all(np.asarray(overflow) == 0)
  for i in range(2):
    one_id, one_img, _ = render(batch_verts[i], cams.c2w[i], cams.fovy[i], masks[i], colors[i])
    np.testing.assert_array_equal(ids[i], one_id)
    np.testing.assert_allclose(imgs[i], one_img, atol=1e-5)
  assert np.any(np.asarray(ids[0]) != np.asarray(ids[1]))


def test_argument_checks():
  verts, faces = _icosphere(0)
  clip = raster.project(verts, np.eye(4), 50.0)
  mask = np.ones(len(faces), bool)
  with pytest.raises(ValueError, match="faces"):
    raster.rasterize(clip, faces + 20, mask, 8, 8)
  with pytest.raises(ValueError, match="face_mask"):
    raster.rasterize(clip, faces, mask[:-1], 8, 8)
  with pytest.raises(ValueError, match="multiple"):
    raster.rasterize(clip, faces, mask, 8, 8, levels=((4, 8), (6, 8)))
  with pytest.raises(ValueError, match="clip"):
    raster.barycentrics(clip[:, :3], faces, np.zeros((8, 8), np.int32), 8, 8)
  with pytest.raises(ValueError, match="tri_id"):
    raster.antialias(np.zeros((8, 8, 3)), clip, faces, mask, np.zeros((8, 9), np.int32))
  with pytest.raises(ValueError, match="fovy"):
    raster.project(verts, np.eye(4), 180.0)


def test_shared_edges_are_watertight():
  # A unit grid of vertices at pixel corners, each cell split along a
  # diagonal: every pixel centre lies on a shared edge. Random W per vertex
  # (same screen position) makes the edge functions round.
  size = 32
  rng = np.random.default_rng(6)
  a, b = np.meshgrid(np.arange(size + 1), np.arange(size + 1), indexing="ij")  # rows, cols
  w = rng.uniform(0.5, 2.0, a.shape)
  x, y = 2.0 * b / size - 1.0, 1.0 - 2.0 * a / size
  clip = np.stack([x * w, y * w, np.zeros_like(w), w], -1).reshape(-1, 4)
  idx = lambda i, j: i * (size + 1) + j
  i, j = (c.reshape(-1) for c in np.meshgrid(np.arange(size), np.arange(size), indexing="ij"))
  p00, p01, p10, p11 = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
  main = rng.uniform(size=i.shape) < 0.5  # diagonal p00-p11, else p01-p10
  first = np.where(main[:, None], np.stack([p00, p01, p11], -1), np.stack([p00, p01, p10], -1))
  second = np.where(main[:, None], np.stack([p00, p11, p10], -1), np.stack([p01, p11, p10], -1))
  faces = np.concatenate([first, second]).astype(np.int32)
  ids = np.asarray(raster.rasterize(clip, faces, np.ones(len(faces), bool), size, size).tri_id)
  assert np.all(ids >= 0)
  cell = (ids % (size * size)).reshape(size, size)  # both faces of a cell cover its centre
  np.testing.assert_array_equal(cell, np.arange(size * size).reshape(size, size))


def test_antialias_matches_supersampling():
  # A small sphere in front of a large one over a black background, flat
  # colours 1.0, 0.4 and 0; the reference averages 8 x 8 samples per pixel.
  big, faces_big = _icosphere(3, 0.8)
  small, faces_small = _icosphere(2, 0.3)
  small = small + [1.2, 0.45, 0.3]  # towards the camera at +x, off to the side
  verts = np.concatenate([big, small])
  faces = np.concatenate([faces_big, faces_small + len(big)]).astype(np.int32)
  mask = np.ones(len(faces), bool)
  cam = cameras.from_spherical(3.0, 0.0, 0.0, 45.0)
  clip = raster.project(verts, cam.c2w, cam.fovy)

  def hard(size):
    r = raster.rasterize(clip, faces, mask, size, size)
    return r.tri_id, jnp.where(r.tri_id >= len(faces_big), 1.0, 0.4) * (r.tri_id >= 0)

  size, factor = 32, 8
  ids, image = hard(size)
  smooth = np.asarray(raster.antialias(image[..., None], clip, faces, mask, ids))[..., 0]
  fine = np.asarray(hard(size * factor)[1]).reshape(size, factor, size, factor).mean((1, 3))
  image = np.asarray(image)
  ids = np.asarray(ids)
  obj = np.where(ids < 0, 0, np.where(ids >= len(faces_big), 2, 1))
  pad = np.pad(obj, 1, mode="edge")
  near = np.stack([pad[di : di + size, dj : dj + size] for di, dj in np.ndindex(3, 3)])
  for name, where in (
    ("silhouettes over the background", np.any(near == 0, 0) & np.any(near > 0, 0)),
    (
      "the small sphere over the large one",
      np.all(near > 0, 0) & np.any(near == 1, 0) & np.any(near == 2, 0),
    ),
  ):
    err_hard = np.abs(image - fine)[where].mean()
    err_smooth = np.abs(smooth - fine)[where].mean()
    assert where.sum() > 20 and err_smooth < 0.5 * err_hard, (name, err_smooth, err_hard)
