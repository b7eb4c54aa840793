"""A tetrahedral grid of a box for DMTet (Kuhn / Freudenthal split).

The box [lo, hi] (the cube [-bound, bound]^3 of `kuhn_grid`, or a box fitted
to an object, `in_box`) is cut into N^3 cells of sides h = (hi - lo) / N per
axis (N = `resolution`); vertex (i, j, k), 0 <= i, j, k <= N, sits at
lo + h * (i, j, k) and has the flat id i + (N + 1) * j + (N + 1)^2 * k
(x fastest). Each cell is split into 6 tetrahedra along its main diagonal:
for a permutation (a, b, c) of the axes, the tet of the monotone path

    c0,  c0 + e_a,  c0 + e_a + e_b,  c0 + e_a + e_b + e_c = c0 + (1, 1, 1)

from the cell's lower corner c0. The six paths share the diagonal and fill the
cell; neighbouring cells cut their common face along the same diagonal, so
the tets form a conforming mesh (each interior triangle is shared by exactly
two tets). Every tet has volume h_x h_y h_z / 6. Its orientation
det[v1 - v0, v2 - v0, v3 - v0] = h_x h_y h_z det[e_a, e_b, e_c] is the sign
of the permutation; the odd ones swap their local vertices 1 and 2, so that
all tets are positively oriented (the marching-tets triangle table relies on
it).

Edges: every tet edge joins a vertex to one of 7 neighbours with offsets in
{0, 1}^3 \\ {0} (the path is monotone), so an edge is a pair (lower vertex,
offset type) and the edge list is built without sorting: the dense table
[V, 7] of candidate edges, kept where the upper end lies in the grid, listed
by lower vertex and then by offset in order of the flat-id step (1, N + 1,
N + 2, (N + 1)^2, ...), which gives the pairs (a, b), a < b, in lexicographic
order. There are 3 N (N + 1)^2 axis edges, 3 N^2 (N + 1) face diagonals and
N^3 cell diagonals.

Everything here is host-side numpy, built once per resolution: at N = 64 the
grid has 274,625 vertices, 1,572,864 tets and 1,872,064 edges.
"""

import itertools
from typing import NamedTuple

import numpy as np

from vsdjax import checks

# Local vertex pairs of the 6 edges of a tet, in the order of `TetGrid.tet_edges`.
TET_EDGE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
# Largest resolution: keeps V * 7 dense edge slots and 6 N^3 tet ids within int32.
_MAX_RESOLUTION = 512
# [7, 3] edge offsets in {0, 1}^3 \ {0}, in increasing order of their flat-id step
# dx + (N + 1) dy + (N + 1)^2 dz (the same order for every N >= 1).
_EDGE_OFFSETS = np.array(
  [(1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)], np.int64
)


class TetGrid(NamedTuple):
  """A tetrahedral grid (numpy arrays, static for jit).

  Attributes:
    verts: [V, 3] float32 rest positions in the box, V = (N + 1)^3.
    tets: [T, 4] int32 vertex ids, T = 6 N^3, all positively oriented
      (det[v1 - v0, v2 - v0, v3 - v0] > 0).
    edges: [E, 2] int32 unique vertex pairs (a, b), a < b, in lexicographic
      order.
    tet_edges: [T, 6] int32 edge ids of each tet's local vertex pairs 01, 02,
      03, 12, 13, 23 (`TET_EDGE_PAIRS`).
    resolution: cells per axis N.
    box: ((lo_x, lo_y, lo_z), (hi_x, hi_y, hi_z)), the grid's corners (floats).
  """

  verts: np.ndarray
  tets: np.ndarray
  edges: np.ndarray
  tet_edges: np.ndarray
  resolution: int
  box: tuple

  @property
  def cell_size(self) -> np.ndarray:
    """[3] sides h = (hi - lo) / resolution of a grid cell along x, y, z."""
    lo, hi = np.asarray(self.box, np.float64)
    return (hi - lo) / self.resolution


def _kuhn_cell() -> np.ndarray:
  """[6, 4, 3] int64 corner offsets of the 6 positively oriented tets of a unit cell."""
  tets = []
  for perm in itertools.permutations(range(3)):
    steps = np.eye(3, dtype=np.int64)[list(perm)]  # [3, 3] rows e_a, e_b, e_c
    path = np.concatenate([np.zeros((1, 3), np.int64), np.cumsum(steps, axis=0)])  # [4, 3]
    if np.linalg.det(steps.astype(np.float64)) < 0:
      path = path[[0, 2, 1, 3]]
    tets.append(path)
  return np.stack(tets)


def kuhn_grid(resolution: int, bound: float) -> TetGrid:
  """The Kuhn tetrahedral grid of [-bound, bound]^3 with `resolution` cells per axis.

  Args:
    resolution: cells per axis N, in [1, 512].
    bound: half the side of the cube, > 0.

  Returns:
    TetGrid with (N + 1)^3 vertices, 6 N^3 tets and
    3 N (N + 1)^2 + 3 N^2 (N + 1) + N^3 edges (see the module docstring).
  """
  n = checks.check_int("resolution", resolution)
  if n > _MAX_RESOLUTION:
    raise ValueError(f"resolution must be <= {_MAX_RESOLUTION} (int32 ids), got {n}")
  bound = checks.check_number("bound", bound, 0.0, np.inf)
  side = n + 1
  stride = np.array([1, side, side * side], np.int64)  # flat-id step per axis

  # Vertices, x fastest.
  axis = np.arange(side, dtype=np.int64)
  ijk = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")[::-1], axis=-1).reshape(-1, 3)
  verts = (-bound + (2.0 * bound / n) * ijk).astype(np.float32)  # [V, 3]

  # Tets: 6 per cell, cells in the order of their lower corners.
  lower = np.arange(n, dtype=np.int64)
  corner = (
    lower[None, None, :] * stride[0]
    + lower[None, :, None] * stride[1]
    + lower[:, None, None] * stride[2]
  ).reshape(-1)  # [N^3]
  cell = _kuhn_cell() @ stride  # [6, 4] flat-id offsets
  tets = (corner[:, None, None] + cell[None]).reshape(-1, 4)  # [T, 4]

  # Edges: dense slots (lower vertex, offset type), kept where the upper end exists.
  step = _EDGE_OFFSETS @ stride  # [7], increasing
  inside = np.all(ijk[:, None, :] + _EDGE_OFFSETS[None] <= n, axis=-1)  # [V, 7]
  compact = np.cumsum(inside.reshape(-1)) - 1  # [V * 7] edge id of each kept slot
  slot = np.nonzero(inside.reshape(-1))[0]  # [E]
  low = slot // 7
  edges = np.stack([low, low + step[slot % 7]], axis=-1)  # [E, 2]

  # Each tet's 6 edges: the slot (min id, type of the id step) is the cell's
  # corner slot plus a per-cell pattern, the same for every cell.
  a, b = (cell[:, [pair[end] for pair in TET_EDGE_PAIRS]] for end in (0, 1))  # [6, 6] each
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  pattern = lo * 7 + np.searchsorted(step, hi - lo)  # [6, 6]
  tet_edges = compact[(corner[:, None, None] * 7 + pattern[None]).reshape(-1, 6)]  # [T, 6]

  return TetGrid(
    verts=verts,
    tets=tets.astype(np.int32),
    edges=edges.astype(np.int32),
    tet_edges=tet_edges.astype(np.int32),
    resolution=n,
    box=((-bound,) * 3, (bound,) * 3),
  )


def in_box(grid: TetGrid, lo, hi) -> TetGrid:
  """The same grid (ids, tets, edges) with its vertices mapped affinely onto the box [lo, hi].

  A positive scaling per axis, so the tets stay positively oriented.

  Args:
    grid: a tet grid.
    lo, hi: [3] the new box's corners, lo < hi on every axis.
  """
  lo, hi = (np.asarray(c, np.float64).reshape(3) for c in (lo, hi))
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
    raise ValueError(f"in_box needs finite corners lo < hi on every axis, got {lo} and {hi}")
  old_lo, old_hi = np.asarray(grid.box, np.float64)
  unit = (grid.verts - old_lo) / (old_hi - old_lo)  # [V, 3] in [0, 1]
  return grid._replace(
    verts=(lo + unit * (hi - lo)).astype(np.float32),
    box=(tuple(float(x) for x in lo), tuple(float(x) for x in hi)),
  )
