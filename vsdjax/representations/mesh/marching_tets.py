"""Marching tetrahedra under jit: a triangle mesh of the zero level set of a grid SDF.

Convention: sdf < 0 inside, sdf > 0 outside (sdf = 0 counts as inside). A
tet's case is sum_i [sdf(v_i) > 0] 2^i over its local vertices 0..3. An edge
(a, b) is cut when exactly one end is outside; its crossing vertex is the
zero of the linear interpolation of the sdf along it,

    x = (p_a (-s_b) + p_b s_a) / (s_a - s_b) = p_a + (p_b - p_a) s_a / (s_a - s_b),

where s_a - s_b is non-zero on cut edges (one value > 0, the other <= 0). A
tet with one vertex on one side and three on the other holds one triangle
through its 3 cut edges; with two on each side, a quad through its 4 cut
edges, split into two triangles along a diagonal inside the tet; otherwise
nothing. Triangles are oriented counter-clockwise seen from outside (normal
by the right-hand rule pointing from the inside to the outside vertices):
the table is derived once, on the reference tet (0, e_x, e_y, e_z), and holds
for every positively oriented tet, because the orientation of a triangle
with respect to the vertices it separates does not change when its points
slide along their edges.

Static shapes under jit: a crossing vertex is computed for every grid edge
(`Mesh.verts` [E, 3], the vertex id is the edge id, so faces of neighbouring
tets share vertices; uncut edges get their midpoint, used by no face), each
tet emits two candidate triangles, and `jnp.nonzero(..., size=max_faces)`
keeps the first max_faces valid ones in tet order. The true count and an
overflow flag come with the mesh: truncation is never silent, and
`check_overflow` turns it into an error on the host.

Gradients flow to the sdf and to the vertex positions through the crossing
vertices (the topology, i.e. the faces, is piecewise constant). The
interpolation uses a masked denominator, floored away from zero, so uncut
edges have zero gradient and no edge gives NaN or inf. A tet flattened or
inverted by large deformations can give flipped or degenerate faces;
`deform` bounds the displacement to a fraction of a cell.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from vsdjax import checks
from vsdjax.representations.mesh.tetgrid import TET_EDGE_PAIRS, TetGrid


class Mesh(NamedTuple):
  """A triangle mesh with static shapes from `marching_tets`.

  Attributes:
    verts: [E, 3] one candidate vertex per grid edge (vertex id = edge id);
      vertices of uncut edges are used by no valid face.
    faces: [M, 3] int32 vertex ids, M = max_faces; rows past n_faces are 0.
    face_mask: [M] bool, True for the first min(n_faces, M) rows.
    n_faces: [] int32 number of faces before truncation to M.
    overflow: [] bool, n_faces > M (faces were dropped).
  """

  verts: jnp.ndarray
  faces: jnp.ndarray
  face_mask: jnp.ndarray
  n_faces: jnp.ndarray
  overflow: jnp.ndarray


def _triangle_table():
  """Triangles per tet case, as local edge ids (indices into TET_EDGE_PAIRS).

  Returns:
    (tris [16, 2, 3] int32, counts [16] int32): case c has counts[c] triangles
    tris[c, :counts[c]], counter-clockwise seen from the outside vertices;
    unused rows are 0.
  """
  ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)  # det = 1 > 0
  tris = np.zeros((16, 2, 3), np.int32)
  counts = np.zeros(16, np.int32)
  for case in range(16):
    outside = [(case >> i) & 1 == 1 for i in range(4)]
    cut = [e for e, (p, q) in enumerate(TET_EDGE_PAIRS) if outside[p] != outside[q]]
    if not cut:
      continue
    # Order the cut edges into a cycle: consecutive edges share a tet vertex.
    cycle = [cut.pop(0)]
    while cut:
      nxt = next(e for e in cut if set(TET_EDGE_PAIRS[e]) & set(TET_EDGE_PAIRS[cycle[-1]]))
      cycle.append(nxt)
      cut.remove(nxt)
    # Orient it: the normal of its first three midpoints points to the outside vertices.
    mid = np.array([ref[list(TET_EDGE_PAIRS[e])].mean(axis=0) for e in cycle])
    normal = np.cross(mid[1] - mid[0], mid[2] - mid[0])
    out_dir = ref[np.array(outside)].mean(axis=0) - ref[~np.array(outside)].mean(axis=0)
    if normal @ out_dir < 0:
      cycle = cycle[::-1]
    counts[case] = len(cycle) - 2
    tris[case, 0] = cycle[:3]
    if len(cycle) == 4:
      tris[case, 1] = [cycle[0], cycle[2], cycle[3]]
  return tris, counts


_TRIS, _COUNTS = _triangle_table()


def marching_tets(grid: TetGrid, sdf: jnp.ndarray, positions: jnp.ndarray, max_faces: int) -> Mesh:
  """The triangle mesh of the zero level set of `sdf` on `grid` (see the module docstring).

  Jittable with `max_faces` static (the grid's arrays may be constants or
  arguments); differentiable w.r.t. `sdf` and `positions`.

  Args:
    grid: the tet grid (its tets, edges and tet_edges are used).
    sdf: [V] signed distance per grid vertex, < 0 inside.
    positions: [V, 3] vertex positions (grid.verts, or `deform`'s output).
    max_faces: static number M of face rows (`default_max_faces`).

  Returns:
    Mesh with verts in the promoted float dtype of sdf and positions.
  """
  max_faces = checks.check_int("max_faces", max_faces)
  n_verts = grid.verts.shape[0]
  sdf, positions = jnp.asarray(sdf), jnp.asarray(positions)
  if sdf.shape != (n_verts,):
    raise ValueError(
      f"sdf must have shape [{n_verts}] (one value per grid vertex), got {sdf.shape}"
    )
  if positions.shape != (n_verts, 3):
    raise ValueError(f"positions must have shape [{n_verts}, 3], got {positions.shape}")
  dtype = jnp.promote_types(sdf.dtype, positions.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"sdf and positions must be floating point, got {sdf.dtype}, {positions.dtype}"
    )
  checks.check_finite("sdf", sdf)
  checks.check_finite("positions", positions)
  sdf, positions = sdf.astype(dtype), positions.astype(dtype)
  edges = jnp.asarray(grid.edges)  # [E, 2]
  tets = jnp.asarray(grid.tets)  # [T, 4]
  tet_edges = jnp.asarray(grid.tet_edges)  # [T, 6]

  # A crossing vertex per edge; the midpoint where the edge is not cut. On a cut
  # edge s_a - s_b has the sign of s_a; its magnitude is floored at 4 sqrt(tiny)
  # (2^-61 in float32) so that the (s_a - s_b)^2 of the gradient stays a normal
  # number, not flushed to zero: a huge but finite gradient where both ends are
  # within ~1e-18 of zero.
  s_a, s_b = sdf[edges[:, 0]], sdf[edges[:, 1]]  # [E]
  cut = (s_a > 0) != (s_b > 0)  # [E]
  floor = 2.0 ** (jnp.finfo(dtype).minexp // 2 + 2)
  diff = s_a - s_b  # [E]
  diff = jnp.where(diff > 0, jnp.maximum(diff, floor), jnp.minimum(diff, -floor))  # [E]
  denom = jnp.where(cut, diff, 1.0)  # [E], non-zero
  t = jnp.where(cut, s_a / denom, 0.5)  # [E], in [0, 1]
  p_a, p_b = positions[edges[:, 0]], positions[edges[:, 1]]  # [E, 3]
  verts = p_a + t[:, None] * (p_b - p_a)  # [E, 3]

  # Two candidate triangles per tet, slot-major within a tet; keep the first M valid.
  outside = sdf[tets] > 0  # [T, 4]
  case = jnp.sum(outside.astype(jnp.int32) << jnp.arange(4, dtype=jnp.int32), axis=-1)  # [T]
  counts = jnp.asarray(_COUNTS)[case]  # [T]
  valid = jnp.arange(2, dtype=jnp.int32) < counts[:, None]  # [T, 2]
  n_faces = jnp.sum(counts)
  (pick,) = jnp.nonzero(valid.reshape(-1), size=max_faces, fill_value=0)  # [M]
  tet, slot = pick // 2, pick % 2  # [M]
  local = jnp.asarray(_TRIS)[case[tet], slot]  # [M, 3] local edge ids
  faces = jnp.take_along_axis(tet_edges[tet], local, axis=1)  # [M, 3] global edge ids
  face_mask = jnp.arange(max_faces) < n_faces  # [M]
  faces = jnp.where(face_mask[:, None], faces, 0)
  return Mesh(
    verts=verts,
    faces=faces.astype(jnp.int32),
    face_mask=face_mask,
    n_faces=n_faces.astype(jnp.int32),
    overflow=n_faces > max_faces,
  )


def deform(grid: TetGrid, deformation: jnp.ndarray, max_fraction: float = 0.5) -> jnp.ndarray:
  """Deformed grid positions: verts + tanh(deformation) * max_fraction * cell_size (per axis).

  Each vertex moves by less than max_fraction of a cell along each axis. With
  the default 0.5 the displacement is tanh(d) * side / (2 N) of the box's
  side along that axis: at N = 64 that is tanh(d) / 128 of the side, the
  displacement tanh(d) / resolution of threestudio's "resolution 128" tet
  grid on its (unit, then scaled to the box) grid, which has about the same
  number of vertices and tets.

  Args:
    grid: the tet grid.
    deformation: [V, 3] unbounded per-vertex offsets (parameters).
    max_fraction: bound on the displacement per axis, in cells, in (0, 1).

  Returns:
    [V, 3] positions in the dtype of `deformation` (float32 at least).
  """
  max_fraction = checks.check_number("max_fraction", max_fraction, 0.0, 1.0)
  deformation = jnp.asarray(deformation)
  n_verts = grid.verts.shape[0]
  if deformation.shape != (n_verts, 3):
    raise ValueError(f"deformation must have shape [{n_verts}, 3], got {deformation.shape}")
  dtype = jnp.promote_types(deformation.dtype, jnp.float32)
  scale = jnp.asarray(max_fraction * grid.cell_size, dtype)  # [3]
  return jnp.asarray(grid.verts, dtype) + jnp.tanh(deformation.astype(dtype)) * scale


def default_max_faces(grid: TetGrid) -> int:
  """A face budget for `marching_tets` on `grid`: 64 N^2 rounded up to a multiple of 1024.

  A smooth surface of area A cut by a Kuhn grid of cell h = 2 bound / N gives
  about 9 A / h^2 faces (measured on spheres, tori, a tilted plane and a box
  at N = 16, 32, 64: 8.0 to 9.2). The largest convex surface inside the grid
  is the box itself, A = 6 (2 bound)^2 = 6 N^2 h^2, so about 54 N^2 faces; a
  sphere touching the box (A = pi N^2 h^2) makes about 28 N^2. The budget,
  64 N^2 (262,144 faces at N = 64, 1,048,576 at N = 128), holds any convex
  shape in the box and non-convex ones of up to 1.2 times the box's area.
  Grids of N <= 6 get all of their 12 N^3 candidate triangles.
  """
  n = grid.resolution
  return min(-(-64 * n * n // 1024) * 1024, 12 * n**3)


def check_overflow(mesh: Mesh) -> None:
  """Raises ValueError if `mesh` (concrete, on the host) dropped faces.

  Policy: `marching_tets` never fails under jit; it returns `overflow` and
  `n_faces`. A training step returns them as metrics and the host calls this
  (or logs the metric); a larger max_faces or a smoother sdf fixes it.
  """
  if not (checks.is_concrete(mesh.overflow) and checks.is_concrete(mesh.n_faces)):
    raise TypeError("check_overflow runs on the host; under jit, return mesh.overflow as a metric")
  overflow, n_faces = np.asarray(mesh.overflow), np.asarray(mesh.n_faces)
  if np.any(overflow):
    raise ValueError(
      f"marching_tets made {int(np.max(n_faces))} faces but max_faces is "
      f"{mesh.faces.shape[-2]}; the extra faces were dropped (raise max_faces)"
    )


def used_mesh(mesh: Mesh):
  """The valid part of one mesh, on the host, for exports and tests.

  Args:
    mesh: a concrete Mesh (not batched).

  Returns:
    (verts [n, 3], faces [f, 3] int64) numpy: the valid faces, reindexed to
    the vertices they use (in increasing order of their edge ids).
  """
  faces = np.asarray(mesh.faces)[np.asarray(mesh.face_mask)]  # [f, 3]
  used, inverse = np.unique(faces, return_inverse=True)
  return np.asarray(mesh.verts)[used], inverse.reshape(faces.shape).astype(np.int64)


def from_host(verts, faces) -> Mesh:
  """A host mesh (verts [v, 3], faces [f, 3]) as a Mesh of jax arrays, every face valid."""
  return Mesh(
    verts=jnp.asarray(verts, jnp.float32),
    faces=jnp.asarray(faces, jnp.int32),
    face_mask=jnp.ones(len(faces), bool),
    n_faces=jnp.int32(len(faces)),
    overflow=jnp.bool_(False),
  )
