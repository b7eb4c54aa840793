"""Tests of the DMTet mesh code: Kuhn grid, marching tets, mesh geometry.

References are independent of the code under test: the grid against a
python-loop construction, meshes of analytic SDFs against their surfaces,
topology (Euler characteristic, watertightness) and volumes, gradients
against central differences in float64, the geometry against python loops
over faces and edges, chamfer distance against brute force.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax.representations.mesh import geometry, marching_tets as mt, tetgrid

SPHERE_R = 0.6
TORUS_R, TORUS_r = 0.5, 0.2


def sphere_sdf(p):
  return np.linalg.norm(p, axis=-1) - SPHERE_R


def torus_sdf(p):
  return np.hypot(np.hypot(p[..., 0], p[..., 1]) - TORUS_R, p[..., 2]) - TORUS_r


_march = jax.jit(mt.marching_tets, static_argnames="max_faces")


def march(grid, sdf, positions=None, max_faces=None):
  """marching_tets, jitted with the grid as arguments (one compile per shape)."""
  positions = grid.verts if positions is None else positions
  max_faces = mt.default_max_faces(grid) if max_faces is None else max_faces
  return _march(grid, jnp.asarray(sdf), jnp.asarray(positions), max_faces=max_faces)


def signed_volume(verts, faces):
  """Volume enclosed by a closed mesh, positive for outward-facing faces (numpy)."""
  v0, v1, v2 = (np.asarray(verts, np.float64)[faces[:, i]] for i in range(3))
  return np.sum(np.einsum("ij,ij->i", v0, np.cross(v1, v2))) / 6.0


def directed_sides(faces):
  """[3F, 2] the sides (0, 1), (1, 2), (2, 0) of every face."""
  return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def assert_closed_oriented_surface(faces):
  """Each directed side appears once and its reverse once: closed, consistently oriented."""
  directed = directed_sides(faces)
  assert np.all(directed[:, 0] != directed[:, 1]), "face with a repeated vertex"
  as_set = set(map(tuple, directed))
  assert len(as_set) == len(directed), "a directed side appears twice (orientation flip)"
  assert all((b, a) in as_set for a, b in as_set), "a side without its twin (hole)"
  undirected = np.sort(directed, axis=1)
  _, counts = np.unique(undirected, axis=0, return_counts=True)
  assert np.all(counts == 2)


def euler_characteristic(faces):
  n_edges = len(np.unique(np.sort(directed_sides(faces), axis=1), axis=0))
  return len(np.unique(faces)) - n_edges + len(faces)


# ---------------------------------------------------------------------------- grid


def slow_kuhn(n, bound):
  """Vertex positions {id: xyz}, tets (sets of ids) and edges of the Kuhn grid, with loops."""
  h = 2.0 * bound / n

  def vid(i, j, k):
    return i + (n + 1) * j + (n + 1) ** 2 * k

  positions = {
    vid(i, j, k): (-bound + h * i, -bound + h * j, -bound + h * k)
    for i in range(n + 1)
    for j in range(n + 1)
    for k in range(n + 1)
  }
  tets, edges = set(), set()
  for i, j, k in itertools.product(range(n), repeat=3):
    for perm in itertools.permutations(range(3)):
      corner = [i, j, k]
      path = [vid(*corner)]
      for axis in perm:
        corner[axis] += 1
        path.append(vid(*corner))
      tets.add(frozenset(path))
      edges.update((min(a, b), max(a, b)) for a, b in itertools.combinations(path, 2))
  return positions, tets, sorted(edges)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_grid_matches_slow_construction(n):
  grid = tetgrid.kuhn_grid(n, 0.7)
  positions, tets, edges = slow_kuhn(n, 0.7)
  want_verts = np.array([positions[i] for i in range(len(positions))])
  np.testing.assert_allclose(grid.verts, want_verts, atol=1e-6)
  assert {frozenset(t) for t in grid.tets.tolist()} == tets and len(grid.tets) == len(tets)
  np.testing.assert_array_equal(grid.edges, np.array(edges))
  edge_id = {e: i for i, e in enumerate(edges)}
  for t, row in zip(grid.tets.tolist(), grid.tet_edges.tolist()):
    want = [edge_id[(min(t[p], t[q]), max(t[p], t[q]))] for p, q in tetgrid.TET_EDGE_PAIRS]
    assert row == want
  assert grid.verts.dtype == np.float32
  assert grid.tets.dtype == grid.edges.dtype == grid.tet_edges.dtype == np.int32


@pytest.mark.parametrize("n", [1, 4, 9])
def test_grid_counts_orientation_and_tiling(n):
  bound = 1.3
  grid = tetgrid.kuhn_grid(n, bound)
  assert grid.verts.shape == ((n + 1) ** 3, 3)
  assert grid.tets.shape == (6 * n**3, 4)
  assert grid.edges.shape == (3 * n * (n + 1) ** 2 + 3 * n**2 * (n + 1) + n**3, 2)
  assert grid.cell_size == pytest.approx(2 * bound / n)
  assert grid.verts.min() == pytest.approx(-bound) and grid.verts.max() == pytest.approx(bound)
  p = grid.verts.astype(np.float64)[grid.tets]  # [T, 4, 3]
  det = np.linalg.det(p[:, 1:] - p[:, :1])
  assert np.all(det > 0)
  np.testing.assert_allclose(det, np.prod(grid.cell_size), rtol=1e-5)  # each tet: h^3 / 6
  assert np.sum(det) / 6 == pytest.approx((2 * bound) ** 3, rel=1e-6)
  # Conforming: every triangle is shared by two tets, except on the cube's boundary.
  tris = np.sort(grid.tets[:, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]].reshape(-1, 3), axis=1)
  uniq, counts = np.unique(tris, axis=0, return_counts=True)
  assert set(counts.tolist()) <= {1, 2}
  boundary = uniq[counts == 1]
  on_side = np.abs(np.abs(grid.verts[boundary]) - bound) < 1e-5  # [B, 3 corners, 3 axes]
  assert np.all(np.any(np.all(on_side, axis=1), axis=1))
  assert len(boundary) == 12 * n**2
  # The edge list is exactly the tets' edges, unique and sorted.
  pairs = np.sort(grid.tets[:, np.array(tetgrid.TET_EDGE_PAIRS)].reshape(-1, 2), axis=1)
  np.testing.assert_array_equal(grid.edges, np.unique(pairs, axis=0))
  np.testing.assert_array_equal(grid.edges[grid.tet_edges].reshape(-1, 2), pairs)


def test_grid_resolution_64_size():
  grid = tetgrid.kuhn_grid(64, 1.0)
  assert grid.verts.shape == (274_625, 3) and grid.tets.shape == (1_572_864, 4)
  assert grid.edges.shape == (1_872_064, 2) and grid.tet_edges.shape == (1_572_864, 6)
  assert grid.tet_edges.max() == len(grid.edges) - 1


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(resolution=0, bound=1.0),
    dict(resolution=2.0, bound=1.0),
    dict(resolution=True, bound=1.0),
    dict(resolution=4, bound=0.0),
    dict(resolution=4, bound=float("nan")),
    dict(resolution=513, bound=1.0),
  ],
)
def test_grid_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    tetgrid.kuhn_grid(**kwargs)


# ---------------------------------------------------------------------------- marching tets


@pytest.fixture(scope="module")
def sphere():
  grid = tetgrid.kuhn_grid(24, 1.0)
  mesh = march(grid, sphere_sdf(grid.verts))
  return grid, mesh


def test_sphere_mesh(sphere):
  grid, mesh = sphere
  mt.check_overflow(mesh)
  assert not mesh.overflow and int(mesh.n_faces) == int(np.sum(mesh.face_mask)) > 0
  assert mesh.verts.shape == (len(grid.edges), 3) and mesh.faces.shape == (
    mt.default_max_faces(grid),
    3,
  )
  assert np.all(np.asarray(mesh.faces)[~np.asarray(mesh.face_mask)] == 0)
  verts, faces = mt.used_mesh(mesh)
  h = grid.cell_size[0]  # a cube's cells
  assert np.max(np.abs(np.linalg.norm(verts, axis=1) - SPHERE_R)) < 0.05 * h
  assert_closed_oriented_surface(faces)
  assert euler_characteristic(faces) == 2
  volume = signed_volume(verts, faces)
  assert volume == pytest.approx(4 / 3 * np.pi * SPHERE_R**3, rel=0.01)
  # Each vertex sits on its own grid edge.
  used = np.unique(np.asarray(mesh.faces)[np.asarray(mesh.face_mask)])
  a, b = grid.verts[grid.edges[used, 0]], grid.verts[grid.edges[used, 1]]
  on_segment = np.linalg.norm(verts - a, axis=1) + np.linalg.norm(verts - b, axis=1)
  np.testing.assert_allclose(on_segment, np.linalg.norm(b - a, axis=1), rtol=1e-5)


def test_torus_mesh():
  grid = tetgrid.kuhn_grid(32, 1.0)
  mesh = march(grid, torus_sdf(grid.verts))
  assert not mesh.overflow
  verts, faces = mt.used_mesh(mesh)
  assert np.max(np.abs(torus_sdf(verts))) < 0.15 * grid.cell_size[0]
  assert_closed_oriented_surface(faces)
  assert euler_characteristic(faces) == 0
  assert signed_volume(verts, faces) == pytest.approx(2 * np.pi**2 * TORUS_R * TORUS_r**2, rel=0.02)


def test_deformed_grid_and_exact_zeros():
  # Vertices at exactly radius 0.5 (sdf = 0 counts as inside), then a deformed grid.
  grid = tetgrid.kuhn_grid(8, 1.0)
  sdf = np.linalg.norm(grid.verts, axis=1) - 0.5
  assert np.sum(sdf == 0) >= 6
  for positions in (
    grid.verts,
    mt.deform(grid, np.random.default_rng(0).normal(size=grid.verts.shape) * 2, max_fraction=0.2),
  ):
    mesh = march(grid, sdf, positions)
    verts, faces = mt.used_mesh(mesh)
    assert np.all(np.isfinite(verts))
    assert_closed_oriented_surface(faces)
    assert euler_characteristic(faces) == 2
    assert signed_volume(verts, faces) > 0


def test_deform():
  grid = tetgrid.kuhn_grid(4, 2.0)
  d = np.random.default_rng(1).normal(size=grid.verts.shape).astype(np.float32) * 3
  got = mt.deform(grid, d)
  np.testing.assert_allclose(got, grid.verts + np.tanh(d) * 0.5 * grid.cell_size, atol=1e-6)
  assert np.all(np.abs(got - grid.verts) <= 0.5 * grid.cell_size)  # tanh saturates in float32
  with pytest.raises(ValueError, match="deformation"):
    mt.deform(grid, d[:-1])
  with pytest.raises(ValueError, match="max_fraction"):
    mt.deform(grid, d, max_fraction=1.5)


def test_a_grid_in_a_box_keeps_its_topology_and_scales_its_cells_and_deformation():
  cube = tetgrid.kuhn_grid(3, 1.0)
  lo, hi = np.array([-0.2, 0.1, -0.9]), np.array([0.6, 0.4, 0.3])
  grid = tetgrid.in_box(cube, lo, hi)
  for name in ("tets", "edges", "tet_edges"):
    np.testing.assert_array_equal(getattr(grid, name), getattr(cube, name))
  np.testing.assert_allclose(grid.cell_size, (hi - lo) / 3)
  # Vertex (i, j, k) at lo + h * (i, j, k), x fastest, as in the cube.
  k, j, i = np.meshgrid(*(np.arange(4),) * 3, indexing="ij")
  ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
  np.testing.assert_allclose(grid.verts, lo + ijk * grid.cell_size, atol=1e-6)
  p = grid.verts.astype(np.float64)[grid.tets]
  det = np.linalg.det(p[:, 1:] - p[:, :1])  # [T], 6 x each tet's volume, all positive
  np.testing.assert_allclose(det, np.prod(grid.cell_size), rtol=1e-5)
  d = np.random.default_rng(2).normal(size=grid.verts.shape).astype(np.float32)
  moved = np.asarray(mt.deform(grid, d)) - grid.verts
  np.testing.assert_allclose(moved, np.tanh(d) * 0.5 * grid.cell_size, atol=1e-6)
  with pytest.raises(ValueError, match="lo < hi"):
    tetgrid.in_box(cube, hi, lo)


def reference_face_count(grid, sdf):
  """Triangles per tet from the number of outside vertices: 1 for 1 or 3, 2 for 2."""
  total = 0
  for tet in grid.tets:
    outside = sum(sdf[v] > 0 for v in tet)
    total += {0: 0, 1: 1, 2: 2, 3: 1, 4: 0}[outside]
  return total


def test_face_count_truncation_and_overflow():
  grid = tetgrid.kuhn_grid(5, 1.0)
  sdf = np.random.default_rng(2).normal(size=len(grid.verts)).astype(np.float32)
  want = reference_face_count(grid, sdf)
  full = march(grid, sdf, max_faces=12 * 5**3)
  assert int(full.n_faces) == want and not full.overflow
  exact = march(grid, sdf, max_faces=want)
  assert not exact.overflow and np.all(exact.face_mask)
  mt.check_overflow(exact)
  small = march(grid, sdf, max_faces=want - 7)
  assert small.overflow and int(small.n_faces) == want and np.all(small.face_mask)
  np.testing.assert_array_equal(
    small.faces, full.faces[: want - 7]
  )  # the first faces, in tet order
  with pytest.raises(ValueError, match=f"made {want} faces but max_faces is {want - 7}"):
    mt.check_overflow(small)


def test_marching_tets_rejects_bad_arguments():
  grid = tetgrid.kuhn_grid(2, 1.0)
  sdf = np.zeros(len(grid.verts), np.float32)
  with pytest.raises(ValueError, match="sdf"):
    mt.marching_tets(grid, sdf[:-1], grid.verts, 16)
  with pytest.raises(ValueError, match="positions"):
    mt.marching_tets(grid, sdf, grid.verts[:, :2], 16)
  with pytest.raises(ValueError, match="max_faces"):
    mt.marching_tets(grid, sdf, grid.verts, 0)
  with pytest.raises(ValueError, match="non-finite"):
    mt.marching_tets(grid, sdf + np.nan, grid.verts, 16)


def test_default_max_faces_holds_shapes_filling_the_box():
  grid = tetgrid.kuhn_grid(16, 1.0)
  budget = mt.default_max_faces(grid)
  assert budget == 64 * 16**2 and mt.default_max_faces(tetgrid.kuhn_grid(64, 1.0)) == 262_144
  assert mt.default_max_faces(tetgrid.kuhn_grid(2, 1.0)) == 12 * 2**3
  p = grid.verts
  for sdf in (np.linalg.norm(p, axis=1) - 0.95, np.max(np.abs(p), axis=1) - 0.9):
    assert not march(grid, sdf).overflow


def test_gradients_match_finite_differences():
  grid = tetgrid.kuhn_grid(4, 1.0)
  rng = np.random.default_rng(3)
  sdf = sphere_sdf(grid.verts.astype(np.float64)) + rng.uniform(-0.1, 0.1, len(grid.verts))
  sdf = np.where(np.abs(sdf) < 1e-2, 1e-2, sdf)  # no sign change under the differences
  positions = grid.verts + rng.uniform(-0.1, 0.1, grid.verts.shape) * grid.cell_size
  max_faces = 12 * 4**3
  weights = rng.normal(size=(max_faces, 3, 3))
  with jax.enable_x64(True):

    @jax.jit
    def loss(sdf, positions):
      mesh = mt.marching_tets(grid, sdf, positions, max_faces)
      tri = jnp.where(mesh.face_mask[:, None, None], mesh.verts[mesh.faces], 0.0)  # [M, 3, 3]
      volume = jnp.sum(jnp.einsum("mi,mi->m", tri[:, 0], jnp.cross(tri[:, 1], tri[:, 2]))) / 6
      return jnp.sum(tri * weights) + 10.0 * volume

    g_sdf, g_pos = jax.grad(loss, argnums=(0, 1))(sdf, positions)
    assert g_sdf.dtype == g_pos.dtype == jnp.float64
    g_sdf, g_pos = np.asarray(g_sdf), np.asarray(g_pos)
    step = 1e-6
    for x, g, other in ((sdf, g_sdf, positions), (positions, g_pos, sdf)):
      fd = np.zeros(x.shape)
      for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += step
        down[i] -= step
        args = (up, other) if x is sdf else (other, up)
        args_down = (down, other) if x is sdf else (other, down)
        fd[i] = (loss(*args) - loss(*args_down)) / (2 * step)
      np.testing.assert_allclose(g, fd, atol=1e-6, rtol=1e-6)
      assert np.count_nonzero(np.abs(fd) > 1e-3) > 20  # the loss does depend on them
  # Vertices on no cut edge get no sdf gradient.
  cut = (sdf[grid.edges[:, 0]] > 0) != (sdf[grid.edges[:, 1]] > 0)
  touched = np.zeros(len(sdf), bool)
  touched[grid.edges[cut].ravel()] = True
  assert np.all(g_sdf[~touched] == 0) and np.any(touched)


def test_gradients_finite_near_zero_sdf():
  # Edge (0, 1) crosses between -1e-25 and 1e-25: (s_a - s_b)^2 underflows in float32.
  grid = tetgrid.kuhn_grid(1, 1.0)
  sdf = np.ones(8, np.float32)
  sdf[0], sdf[1] = -1e-25, 1e-25

  def loss(sdf, positions):
    mesh = mt.marching_tets(grid, sdf, positions, 12)
    return jnp.sum(jnp.where(mesh.face_mask[:, None, None], mesh.verts[mesh.faces], 0.0))

  g_sdf, g_pos = jax.jit(jax.grad(loss, argnums=(0, 1)))(sdf, grid.verts)
  assert np.all(np.isfinite(g_sdf)) and np.all(np.isfinite(g_pos)) and np.any(g_sdf != 0)


# ---------------------------------------------------------------------------- geometry


def flat_grid(n, noise=0.0, seed=0):
  """A regular (n + 1)^2 grid in the z = 0 plane, squares split along one diagonal."""
  i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
  verts = np.stack([i, j, np.zeros_like(i)], axis=-1).reshape(-1, 3).astype(np.float64) / n
  verts[:, 2] += noise * np.random.default_rng(seed).normal(size=len(verts))
  vid = lambda a, b: a * (n + 1) + b
  faces = []
  for a, b in itertools.product(range(n), repeat=2):
    faces += [
      (vid(a, b), vid(a + 1, b), vid(a + 1, b + 1)),
      (vid(a, b), vid(a + 1, b + 1), vid(a, b + 1)),
    ]
  return verts.astype(np.float32), np.array(faces, np.int32), np.ones(len(faces), bool)


def reference_vertex_normals(verts, faces):
  normals = np.zeros((len(verts), 3))
  for f in faces:
    a, b, c = verts[f].astype(np.float64)
    normals[f] += np.cross(b - a, c - a)
  length = np.linalg.norm(normals, axis=1, keepdims=True)
  return np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)


def reference_neighbours(faces):
  neighbours = {}
  for f in faces:
    for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])):
      neighbours.setdefault(a, set()).add(b)
      neighbours.setdefault(b, set()).add(a)
  return neighbours


@pytest.fixture(scope="module")
def small_mesh():
  """A bumpy sphere with masked rows and unused vertices (padded marching-tets output)."""
  grid = tetgrid.kuhn_grid(5, 1.0)
  rng = np.random.default_rng(4)
  mesh = march(
    grid, sphere_sdf(grid.verts), max_faces=int(march(grid, sphere_sdf(grid.verts)).n_faces) + 9
  )
  verts = np.asarray(mesh.verts) + 0.03 * rng.normal(size=mesh.verts.shape).astype(np.float32)
  return verts, np.asarray(mesh.faces), np.asarray(mesh.face_mask)


def test_normal_consistency_and_laplacian_match_loops(small_mesh):
  verts, faces, mask = small_mesh
  assert not mask.all()
  valid = faces[mask]
  normals = reference_vertex_normals(verts, valid)
  np.testing.assert_allclose(geometry.vertex_normals(verts, faces, mask), normals, atol=1e-5)
  neighbours = reference_neighbours(valid)
  edges = {(min(a, b), max(a, b)) for a, nbs in neighbours.items() for b in nbs}
  want_nc = np.mean([1 - normals[a] @ normals[b] for a, b in edges])
  # threestudio's: the rows of (degree - adjacency) @ verts, up to sign.
  lap = {
    v: verts[list(nbs)].astype(np.float64).sum(axis=0) - len(nbs) * verts[v]
    for v, nbs in neighbours.items()
  }
  want_lap = np.mean([np.linalg.norm(x) for x in lap.values()])
  assert float(geometry.normal_consistency(verts, faces, mask)) == pytest.approx(want_nc, rel=1e-5)
  assert float(geometry.laplacian_smoothness(verts, faces, mask)) == pytest.approx(
    want_lap, rel=1e-5
  )
  got_lap, used = map(np.asarray, geometry.uniform_laplacian(verts, faces, mask))
  assert set(np.nonzero(used)[0].tolist()) == set(neighbours)
  np.testing.assert_allclose(got_lap[np.array(list(lap))], np.array(list(lap.values())), atol=1e-6)
  assert np.all(got_lap[~used] == 0)
  got_edges, edge_mask = geometry.unique_edges(faces, mask)
  assert sorted(map(tuple, np.asarray(got_edges)[np.asarray(edge_mask)].tolist())) == sorted(edges)


def test_regularisers_have_finite_gradients(small_mesh):
  verts, faces, mask = small_mesh
  degenerate = faces.copy()
  degenerate[0] = [faces[0, 0], faces[0, 0], faces[0, 1]]  # a zero-area face
  for f in (faces, degenerate):
    loss = lambda v: (
      geometry.normal_consistency(v, f, mask) + geometry.laplacian_smoothness(v, f, mask)
    )
    g = jax.jit(jax.grad(loss))(verts)
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  with jax.enable_x64(True):
    # Directional derivative against a central difference.
    v64 = verts.astype(np.float64)
    direction = np.random.default_rng(5).normal(size=v64.shape)
    loss = jax.jit(
      lambda v: (
        geometry.normal_consistency(v, faces, mask) + geometry.laplacian_smoothness(v, faces, mask)
      )
    )
    step = 1e-6
    fd = (loss(v64 + step * direction) - loss(v64 - step * direction)) / (2 * step)
    assert float(jnp.vdot(jax.grad(loss)(v64), direction)) == pytest.approx(float(fd), rel=1e-5)


def test_flat_and_noisy_planes():
  verts, faces, mask = flat_grid(8)
  assert float(geometry.normal_consistency(verts, faces, mask)) < 1e-6
  np.testing.assert_allclose(
    geometry.vertex_normals(verts, faces, mask), np.tile([0, 0, 1], (len(verts), 1)), atol=1e-6
  )
  lap, used = geometry.uniform_laplacian(verts, faces, mask)
  interior = np.all((verts[:, :2] > 1e-6) & (verts[:, :2] < 1 - 1e-6), axis=1)
  assert np.all(used) and interior.sum() == 49
  np.testing.assert_allclose(np.asarray(lap)[interior], 0, atol=1e-6)
  assert np.all(
    np.linalg.norm(np.asarray(lap)[~interior], axis=1) > 1e-3
  )  # the border pulls inwards
  noisy = flat_grid(8, noise=0.05)
  assert float(geometry.normal_consistency(*noisy)) > 0.01
  # Masking every face: zero regularisers, zero normals, no NaN.
  none = np.zeros_like(mask)
  assert float(geometry.normal_consistency(verts, faces, none)) == 0
  assert float(geometry.laplacian_smoothness(verts, faces, none)) == 0
  assert np.all(geometry.vertex_normals(verts, faces, none) == 0)
  assert np.all(geometry.face_normals(verts, faces, none) == 0)


def test_sphere_vertex_normals_are_radial(sphere):
  _, mesh = sphere
  normals = np.asarray(geometry.vertex_normals(mesh.verts, mesh.faces, mesh.face_mask))
  used = np.unique(np.asarray(mesh.faces)[np.asarray(mesh.face_mask)])
  radial = np.asarray(mesh.verts)[used] / np.linalg.norm(
    np.asarray(mesh.verts)[used], axis=1, keepdims=True
  )
  cos = np.sum(normals[used] * radial, axis=1)
  assert np.min(cos) > 0.98 and np.mean(cos) > 0.998
  unused = np.ones(len(normals), bool)
  unused[used] = False
  assert np.all(normals[unused] == 0)
  face_n = np.asarray(geometry.face_normals(mesh.verts, mesh.faces, mesh.face_mask))[
    np.asarray(mesh.face_mask)
  ]
  centroid = np.asarray(mesh.verts)[np.asarray(mesh.faces)[np.asarray(mesh.face_mask)]].mean(axis=1)
  assert np.all(np.sum(face_n * centroid, axis=1) > 0)  # outward
  np.testing.assert_allclose(np.linalg.norm(face_n, axis=1), 1, atol=1e-5)


def test_sample_surface():
  verts = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [3, 0, 0], [3, 2, 0], [0, 0, 5], [9, 0, 5], [0, 9, 5]],
    np.float32,
  )
  # Areas 0.5 and 2 (valid), and a large masked face at z = 5.
  faces = np.array([[0, 1, 2], [1, 3, 4], [5, 6, 7]], np.int32)
  mask = np.array([True, True, False])
  n = 20000
  points = np.asarray(geometry.sample_surface(jax.random.PRNGKey(0), verts, faces, mask, n))
  assert points.shape == (n, 3) and np.all(points[:, 2] == 0)

  def barycentric(p, tri):
    a, b, c = tri[:, :2].astype(np.float64)
    m = np.stack([b - a, c - a], axis=1)
    uv = np.linalg.solve(m, (p[:, :2] - a).T).T
    return np.concatenate([1 - uv.sum(axis=1, keepdims=True), uv], axis=1)

  inside = [np.all(barycentric(points, verts[f]) > -1e-5, axis=1) for f in faces[:2]]
  assert np.all(inside[0] | inside[1])
  assert np.mean(inside[1]) == pytest.approx(0.8, abs=0.015)
  # Uniform within a face: the mean is the centroid.
  np.testing.assert_allclose(
    points[inside[1] & ~inside[0]].mean(axis=0), verts[[1, 3, 4]].mean(axis=0), atol=0.02
  )


def test_chamfer_matches_brute_force():
  rng = np.random.default_rng(6)
  a = rng.normal(size=(300, 3)).astype(np.float32)
  b = rng.normal(size=(170, 3)).astype(np.float32) + 0.3
  d = np.linalg.norm(a[:, None].astype(np.float64) - b[None], axis=-1)
  want = 0.5 * (d.min(axis=1).mean() + d.min(axis=0).mean())
  for chunk in (64, 1024):
    assert float(geometry.chamfer(a, b, chunk=chunk)) == pytest.approx(want, rel=1e-5)
  assert float(geometry.chamfer(a, a)) == 0
  g = jax.grad(geometry.chamfer)(jnp.asarray(a), jnp.asarray(a))  # zero distances: no NaN
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="b must have shape"):
    geometry.chamfer(a, b[:, :2])
