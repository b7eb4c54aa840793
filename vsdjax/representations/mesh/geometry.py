"""Mesh geometry under jit: normals, the DMTet regularisers, surface samples, chamfer distance.

A mesh is (verts [V, 3], faces [M, 3] int, face_mask [M] bool), as made by
`marching_tets`: static shapes, rows of faces with a False mask ignored
(whatever they point at), vertices used by no valid face allowed.

- Face normal: the cross product c = (v1 - v0) x (v2 - v0), whose length is
  twice the face's area; the unit normal is c / |c| (zero for a degenerate
  or masked face).
- Vertex normal: the sum of c over the valid faces around the vertex
  (area-weighted), normalised; zero for a vertex without valid faces.
- Unique edges: the 3M (min, max) vertex pairs of the face sides, invalid
  faces' pairs replaced by a sentinel above every id, sorted
  lexicographically (`lax.sort`, two keys: no int64 key needed); a pair is
  kept where it differs from its predecessor and is not the sentinel.
- Normal consistency: mean over unique edges (a, b) of 1 - n_a . n_b with
  unit vertex normals n (0 on a flat mesh, up to 2).
- Uniform Laplacian: L(v) = mean of v's neighbours along unique edges - v;
  smoothness = mean over used vertices of |L(v)|.
- Surface samples: a face drawn with probability proportional to its area,
  then a uniform point in it, v0 (1 - sqrt r1) + v1 sqrt r1 (1 - r2) +
  v2 sqrt r1 r2 with r1, r2 uniform in [0, 1).
- Chamfer distance: (mean_i min_j |a_i - b_j| + mean_j min_i |a_i - b_j|) / 2.

Norms and normalisations use masked safe denominators, so zero vectors
(degenerate faces, unused vertices, coincident points) give zeros and finite
gradients, never NaN; normals of vectors below |x| ~ 3e-10 (float32) are
zero.
"""

import jax
import jax.numpy as jnp

from vsdjax import checks


def _face_arrays(faces, face_mask):
  """(faces int32, face_mask bool) as jnp arrays, with their shapes checked."""
  faces, face_mask = jnp.asarray(faces), jnp.asarray(face_mask)
  if faces.ndim != 2 or faces.shape[1] != 3 or not jnp.issubdtype(faces.dtype, jnp.integer):
    raise ValueError(f"faces must be an int array of shape [M, 3], got {faces.dtype}{faces.shape}")
  if face_mask.shape != faces.shape[:1]:
    raise ValueError(f"face_mask must have shape [{faces.shape[0]}], got {face_mask.shape}")
  return faces.astype(jnp.int32), face_mask.astype(bool)


def _mesh_arrays(verts, faces, face_mask):
  """(verts, faces int32, face_mask bool) as jnp arrays, with their shapes checked."""
  verts = jnp.asarray(verts)
  if verts.ndim != 2 or verts.shape[1] != 3 or not jnp.issubdtype(verts.dtype, jnp.floating):
    raise ValueError(f"verts must be a float array of shape [V, 3], got {verts.dtype}{verts.shape}")
  return (verts, *_face_arrays(faces, face_mask))


def _safe_norm(x: jnp.ndarray) -> jnp.ndarray:
  """|x| over the last axis, with gradient 0 (not NaN) at x = 0."""
  sq = jnp.sum(x * x, axis=-1)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _safe_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / |x| over the last axis; 0 where |x|^2 <= sqrt(tiny) (1e-19 in float32).

  The floor keeps the gradient, of order |x|^-1, finite: |x|^-3 x x^T
  overflows for smaller |x|.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = sq > jnp.finfo(sq.dtype).tiny ** 0.5
  return jnp.where(nonzero, x * jax.lax.rsqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _masked_mean(values, mask) -> jnp.ndarray:
  """Mean of values [N] where mask [N]; 0 where nothing is masked in."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(total.dtype)


def _face_cross(verts, faces, face_mask) -> jnp.ndarray:
  """[M, 3] (v1 - v0) x (v2 - v0) per face (twice the area times the unit normal), 0 if masked."""
  tri = verts[faces]  # [M, 3 corners, 3]
  cross = jnp.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # [M, 3]
  return jnp.where(face_mask[:, None], cross, 0.0)


def face_normals(verts, faces, face_mask) -> jnp.ndarray:
  """Unit face normals (right-hand rule on the corner order).

  Args:
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    [M, 3] unit normals; zero for masked or degenerate faces.
  """
  verts, faces, face_mask = _mesh_arrays(verts, faces, face_mask)
  return _safe_normalize(_face_cross(verts, faces, face_mask))


def vertex_normals(verts, faces, face_mask) -> jnp.ndarray:
  """Area-weighted unit vertex normals.

  Args:
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    [V, 3] unit normals; zero for vertices of no valid face (or whose faces'
    normals cancel).
  """
  verts, faces, face_mask = _mesh_arrays(verts, faces, face_mask)
  cross = _face_cross(verts, faces, face_mask)  # [M, 3], 0 on masked rows
  summed = jnp.zeros_like(verts).at[faces.reshape(-1)].add(jnp.repeat(cross, 3, axis=0))  # [V, 3]
  return _safe_normalize(summed)


def unique_edges(faces, face_mask):
  """The mesh's undirected edges, found with static shapes.

  Args:
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    (edges [3M, 2] int32, edge_mask [3M] bool): each unique side (a, b),
    a < b, of the valid faces once, in a row where edge_mask is True, in
    lexicographic order; the other rows (repeats, and the invalid faces' at
    the end) are (0, 0).
  """
  faces, face_mask = _face_arrays(faces, face_mask)
  start, end = faces, jnp.roll(faces, -1, axis=1)  # [M, 3] sides 01, 12, 20
  sentinel = jnp.iinfo(jnp.int32).max
  lo = jnp.where(face_mask[:, None], jnp.minimum(start, end), sentinel).reshape(-1)  # [3M]
  hi = jnp.where(face_mask[:, None], jnp.maximum(start, end), sentinel).reshape(-1)  # [3M]
  lo, hi = jax.lax.sort((lo, hi), num_keys=2)
  new = jnp.concatenate([jnp.ones(1, bool), (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])  # [3M]
  edge_mask = new & (lo != sentinel)
  edges = jnp.where(edge_mask[:, None], jnp.stack([lo, hi], axis=-1), 0)  # [3M, 2]
  return edges, edge_mask


def normal_consistency(verts, faces, face_mask) -> jnp.ndarray:
  """Mean over the unique edges (a, b) of 1 - n_a . n_b (unit vertex normals n).

  Args:
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    [] float, 0 for a mesh without valid faces.
  """
  verts, faces, face_mask = _mesh_arrays(verts, faces, face_mask)
  normals = vertex_normals(verts, faces, face_mask)  # [V, 3]
  edges, edge_mask = unique_edges(faces, face_mask)  # [3M, 2], [3M]
  cos = jnp.sum(normals[edges[:, 0]] * normals[edges[:, 1]], axis=-1)  # [3M]
  return _masked_mean(1.0 - cos, edge_mask)


def uniform_laplacian(verts, faces, face_mask):
  """Uniform Laplacian: the sum over each vertex's neighbours of (neighbour - vertex).

  That is degree x (mean of the neighbours - vertex), the rows of the graph
  Laplacian (degree - adjacency) applied to the positions, up to sign: the
  form of threestudio's `laplacian` regulariser (stable-dreamfusion's), whose
  weight 1e4 the stage-2 config uses.

  Args:
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    (laplacian [V, 3], used [V] bool): neighbours along unique edges of valid
    faces; laplacian is 0 where `used` (the vertex has a neighbour) is False.
  """
  verts, faces, face_mask = _mesh_arrays(verts, faces, face_mask)
  edges, edge_mask = unique_edges(faces, face_mask)  # [3M, 2], [3M]
  a, b = edges[:, 0], edges[:, 1]
  ids = jnp.concatenate([a, b])  # [6M] each edge counted at both ends
  weight = jnp.tile(edge_mask.astype(verts.dtype), 2)  # [6M]
  neighbour = jnp.concatenate([verts[b], verts[a]]) * weight[:, None]  # [6M, 3]
  sums = jnp.zeros_like(verts).at[ids].add(neighbour)  # [V, 3]
  degree = jnp.zeros(verts.shape[:1], verts.dtype).at[ids].add(weight)  # [V]
  used = degree > 0  # [V]
  return jnp.where(used[:, None], sums - degree[:, None] * verts, 0.0), used


def laplacian_smoothness(verts, faces, face_mask) -> jnp.ndarray:
  """Mean over used vertices of |sum over neighbours of (neighbour - vertex)|.

  Args:
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces.

  Returns:
    [] float, 0 for a mesh without valid faces.
  """
  laplacian, used = uniform_laplacian(verts, faces, face_mask)  # [V, 3], [V]
  return _masked_mean(_safe_norm(laplacian), used)


def sample_surface(key: jax.Array, verts, faces, face_mask, n: int) -> jnp.ndarray:
  """Points drawn uniformly on the surface (faces picked in proportion to their area).

  Args:
    key: PRNG key.
    verts: [V, 3] float.
    faces: [M, 3] int vertex ids.
    face_mask: [M] bool, valid faces (at least one of non-zero area, else
      the points are meaningless, though finite).
    n: static number of points.

  Returns:
    [n, 3] points, differentiable w.r.t. verts (the choice of faces is not).
  """
  n = checks.check_int("n", n)
  verts, faces, face_mask = _mesh_arrays(verts, faces, face_mask)
  k_face, k_bary = jax.random.split(key)
  area = jax.lax.stop_gradient(_safe_norm(_face_cross(verts, faces, face_mask)))  # [M], 2x area
  cdf = jnp.cumsum(area)  # [M]
  u = jax.random.uniform(k_face, (n,), cdf.dtype) * cdf[-1]  # [n], in [0, total)
  face = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), faces.shape[0] - 1)  # [n]
  r = jax.random.uniform(k_bary, (n, 2), verts.dtype)  # [n, 2]
  s = jnp.sqrt(r[:, 0])
  bary = jnp.stack([1.0 - s, s * (1.0 - r[:, 1]), s * r[:, 1]], axis=-1)  # [n, 3]
  tri = verts[faces[face]]  # [n, 3 corners, 3]
  return jnp.sum(bary[:, :, None] * tri, axis=1)


def _nearest_distance(x, y, chunk: int) -> jnp.ndarray:
  """[N] distance from each x_i [N, 3] to its nearest y_j [K, 3], chunk rows of x at a time."""
  n = x.shape[0]
  padded = -(-n // chunk) * chunk
  xs = jnp.pad(x, ((0, padded - n), (0, 0))).reshape(-1, chunk, 3)  # [C, chunk, 3]

  def nearest_sq(xc):  # [chunk, 3] -> [chunk]
    return jnp.min(jnp.sum((xc[:, None, :] - y[None, :, :]) ** 2, axis=-1), axis=1)

  sq = jax.lax.map(nearest_sq, xs).reshape(-1)[:n]  # [N]
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def chamfer(a, b, chunk: int = 1024) -> jnp.ndarray:
  """Symmetric chamfer distance: the two mean nearest-neighbour distances, averaged.

  (mean_i min_j |a_i - b_j| + mean_j min_i |a_i - b_j|) / 2, Euclidean (not
  squared) distances computed by differences (no |a|^2 + |b|^2 - 2 a.b
  cancellation). Memory is chunk x max(N, K) distances at a time: 20k points
  each side take [1024, 20000] floats per step.

  Args:
    a: [N, 3] float points.
    b: [K, 3] float points.
    chunk: static rows of one side compared with all of the other at once.

  Returns:
    [] float.
  """
  chunk = checks.check_int("chunk", chunk)
  a, b = jnp.asarray(a), jnp.asarray(b)
  for name, x in (("a", a), ("b", b)):
    if x.ndim != 2 or x.shape[1] != 3 or x.shape[0] < 1:
      raise ValueError(f"{name} must have shape [N, 3] with N >= 1, got {x.shape}")
  dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  a, b = a.astype(dtype), b.astype(dtype)
  return 0.5 * (
    jnp.mean(_nearest_distance(a, b, min(chunk, a.shape[0])))
    + jnp.mean(_nearest_distance(b, a, min(chunk, b.shape[0])))
  )
