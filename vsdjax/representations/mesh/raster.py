"""Triangle-mesh rasterization in pure JAX: visibility, barycentrics, antialiasing.

Coordinates. `project` maps world points x to OpenGL clip space c = (X, Y, Z, W)
through the camera frame p = R^T (x - t) (R, t the rotation and position of
c2w, see vsdjax.cameras) and, with f = 1 / tan(fovy / 2),
  X = (f / aspect) p_x,  Y = f p_y,  Z = A p_z + B,  W = -p_z,
  A = (far + near) / (near - far),  B = 2 far near / (near - far).
W is the depth along the viewing axis and Z >= -W means "beyond the near
plane". A clip point has NDC (x, y) = (X / W, Y / W) and pixel coordinates
  u = (x + 1) width / 2,  v = (1 - y) height / 2  (row 0 at the top);
pixel (i, j) is sampled at its centre (u, v) = (j + 0.5, i + 0.5), the rays of
cameras.rays.

Visibility (`rasterize`, no gradient). A face is drawn if its mask is set, all
three vertices lie beyond the near plane (faces crossing it are culled, not
clipped; there is no far clipping) and its screen-space box holds a pixel
centre. Both windings are drawn unless `cull_back`. Faces are binned into
square tiles at several levels (by default 4, 16 and 64 pixels) plus one
tile covering the whole image: a face goes to the finest level at which its
box (the pixel centres it spans) touches at most 2 x 2 tiles and emits 4
(tile, face) slots there (the unused ones empty); faces too large for the
coarsest level (boxes over 65 pixels by default) go to the whole-image tile.
One `lax.sort` orders the 4F slots by (tile, nearest vertex depth),
`searchsorted` finds each tile's range, and each tile of level l keeps its
first K_l candidates, the nearest ones. A pixel tests the candidates of the
tiles of every level that contain it, 32 at a time in a `fori_loop` whose
trip count is set by the level's fullest tile: the work follows the mesh's
depth complexity, K_l only caps it. Tiles with more than K_l candidates drop
the farthest (by nearest vertex); `Raster.overflow` counts such tiles and
`Raster.dropped` the dropped (tile, face) slots, for the caller to report,
and `Raster.fill` gives each level's fullest tile.

The inside test is watertight. Edge e of a face joins vertices (e + 1, e + 2)
mod 3 and has the edge function
  E_e(u, v) = (u_b - u_a)(v - v_a) - (v_b - v_a)(u - u_a),
evaluated with (a, b) in increasing vertex-id order and then signed for the
face's own winding, so two faces that share an edge compute it bit for bit
alike with opposite signs. A pixel centre is inside when the three E_e have
one sign (zero included). E_e / sum_e E_e are the screen-space barycentrics,
so 1 / W at the pixel is sum_e E_e / W_e / sum_e E_e, and the nearest face
(largest 1 / W, ties to the lowest face id) wins.

Barycentrics (`barycentrics`, differentiable). At pixel NDC (x, y), the point
sum_k b_k c_k of a face projects to (x, y) when
  sum_k b_k (X_k - x W_k) = 0  and  sum_k b_k (Y_k - y W_k) = 0,
so with u_k = X_k - x W_k, v_k = Y_k - y W_k (vectors over the 3 vertices)
  b = (u x v) / sum_k (u x v)_k,
the perspective-correct barycentrics, from the clip-space vertices without a
division by W. Autodiff through b gives the gradients of interpolated
attributes with respect to the vertices inside faces.

Silhouettes (`antialias`). Each pixel pair (i, j)-(i, j + 1) and
(i, j)-(i + 1, j) with different triangle ids is a discontinuity. Its
occluder is the non-background side, or the side with the smaller depth W.
An edge is a silhouette edge if it has no neighbour face, or the neighbour's
third vertex lies on the same side of the edge as the face's own (the
surface folds away behind the edge); the side test is the sign of the
determinant of the (X, Y, W) rows of the edge's two vertices and the third
vertex, right for vertices behind the camera as well. Edges are matched to
neighbours by sorting the 3F (min, max) vertex-id keys of the unmasked
faces: a key found exactly twice pairs its two faces; an edge of a single
face, or shared by three or more faces (non-manifold), counts as a boundary,
hence a silhouette. The silhouette edge is searched along the segment
between the two pixel centres: from the occluder's centre, a walk leaves
each face through the edge that the segment's line crosses ahead and enters
the neighbour across it, until that edge is a silhouette (found), the
crossing lies beyond the other centre or `max_hops` faces were visited (not
found). On a finely tessellated surface the faces along a silhouette are
foreshortened slivers that hold no pixel centre, so the silhouette is
usually a few faces beyond the occluder's own edges. The edge counts if it
is steeper than 45 degrees for horizontal pairs (flatter for vertical pairs),
so each edge is handled in one direction. With the crossing at fraction t
from the occluder's centre towards the other's, a 1D box filter gives
  t < 0.5: occluder pixel += (0.5 - t) (other colour - occluder colour),
  t > 0.5: other pixel += (t - 0.5) (occluder colour - other colour),
all pairs adding their changes to the input colours. The choices (occluder,
walk, branch) are under stop_gradient; t is a differentiable function of
the silhouette edge's clip-space vertices, so silhouette gradients reach
vertex positions. Coverage comes only from such discontinuities: a sliver of
a face that holds no pixel centre (near a vertex) adds none, so the output
jumps where a vertex's neighbourhood crosses a pixel centre; between such
events it is continuous and piecewise smooth in the vertices.

All shapes are static: every function works under jit and vmap (e.g. over
particles, each with its own mesh, face mask and camera).
"""

import functools
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks

# Tiles (side in pixels, candidates kept per tile K) of the binning levels,
# finest first, and the K of the whole-image tile. The fullest tiles of
# benchmarks/raster.py's spheres (radius 0.5, bumps of up to 15%) at 512 x 512,
# over 8 cameras drawn as in training (distance 1 to 1.5, fovy 40 to 70), held
# per level: 10k faces (27, 93, 26, 0), 100k (174, 31, 0, 0), 300k (311, 15,
# 0, 0); with cull_back about half as many at the finest level. The work
# follows these counts, not K (see the module docstring).
DEFAULT_LEVELS = ((4, 384), (16, 256), (64, 128))
DEFAULT_LARGE = 64

# Faces a silhouette walk may cross. Measured on benchmarks/raster.py's spheres at
# 256 x 256: the walks found most silhouettes within 8 faces at 10k faces, 16 at
# 100k and 32 at 300k (the plain occluder-only search, 1, found almost none).
DEFAULT_MAX_HOPS = 32
# Candidates tested per pass of the per-pixel loop.
_CHUNK = 32
_INT_MAX = np.iinfo(np.int32).max  # sentinel ids (faces, vertices)
# Pixel boxes of faces grow by this (pixels), so that a centre on a box side
# whose inside test rounds to "inside" is still a candidate.
_BOX_EPS = 1.0 / 256.0
# Edge e of a face joins vertices _NEXT[e] and _PREV[e]; vertex e is opposite.
_NEXT = np.array([1, 2, 0], np.int32)
_PREV = np.array([2, 0, 1], np.int32)


class Raster(NamedTuple):
  """Output of `rasterize` (all under stop_gradient).

  Attributes:
    tri_id: [H, W] int32 index of the face seen at each pixel centre, -1 for
      background.
    depth: [H, W] depth W (along the viewing axis) of the visible surface, 0
      for background.
    overflow: [] int32, tiles (all levels) with more candidates than their K.
    dropped: [] int32, (tile, face) slots beyond K that were not tested.
    fill: [L + 1] int32, the largest number of candidates of a tile at each
      level, the whole-image tile last (compare with the K of `levels`).
  """

  tri_id: jnp.ndarray
  depth: jnp.ndarray
  overflow: jnp.ndarray
  dropped: jnp.ndarray
  fill: jnp.ndarray


def _float(x) -> jnp.ndarray:
  """x as an array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))


def _check_faces(faces, n_verts: int) -> jnp.ndarray:
  """Checks faces [F, 3] (integers in [0, n_verts)); returns them as int32."""
  faces = jnp.asarray(faces)
  if faces.ndim != 2 or faces.shape[-1] != 3 or not jnp.issubdtype(faces.dtype, jnp.integer):
    raise ValueError(f"faces must be an integer array [F, 3], got {faces.dtype} {faces.shape}")
  checks.check_range("faces", faces, 0, n_verts - 1)
  return faces.astype(jnp.int32)


def _check_mesh(clip, faces) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Checks clip [V, 4] and faces [F, 3]; returns them cast."""
  clip = _float(clip)
  if clip.ndim != 2 or clip.shape[-1] != 4:
    raise ValueError(f"clip must have shape [V, 4], got {clip.shape}")
  return clip, _check_faces(faces, clip.shape[0])


def _check_tri_id(tri_id, height=None, width=None) -> jnp.ndarray:
  """Checks tri_id [H, W] (integers; the given H and W if any); returns it as int32."""
  tri_id = jnp.asarray(tri_id)
  if tri_id.ndim != 2 or not jnp.issubdtype(tri_id.dtype, jnp.integer):
    raise ValueError(f"tri_id must be an integer array [H, W], got {tri_id.dtype} {tri_id.shape}")
  if height is not None and tri_id.shape != (height, width):
    raise ValueError(f"tri_id must have shape [{height}, {width}], got {tri_id.shape}")
  return tri_id.astype(jnp.int32)


def _check_face_mask(face_mask, n_faces: int) -> jnp.ndarray:
  """Checks face_mask [n_faces] bool."""
  face_mask = jnp.asarray(face_mask)
  if face_mask.shape != (n_faces,) or face_mask.dtype != jnp.bool_:
    raise ValueError(
      f"face_mask must be a bool array [{n_faces}], got {face_mask.dtype} {face_mask.shape}"
    )
  return face_mask


def project(verts, c2w, fovy, aspect=1.0, near=0.01, far=100.0) -> jnp.ndarray:
  """World points to OpenGL clip space (see the module docstring).

  Args:
    verts: [V, 3] world positions.
    c2w: [4, 4] camera-to-world matrix with an orthonormal rotation (OpenGL
      axes, as built by vsdjax.cameras).
    fovy: scalar vertical field of view, degrees, in (0, 180).
    aspect: width / height of the image.
    near: distance of the near plane, > 0.
    far: distance of the far plane, > near.

  Returns:
    clip: [V, 4] (X, Y, Z, W), full float32 (or float64) precision.
  """
  verts = _float(verts)
  c2w = _float(c2w)
  if verts.ndim != 2 or verts.shape[-1] != 3:
    raise ValueError(f"verts must have shape [V, 3], got {verts.shape}")
  if c2w.shape != (4, 4):
    raise ValueError(f"c2w must have shape [4, 4], got {c2w.shape}")
  if jnp.ndim(fovy) != 0:
    raise ValueError(f"fovy must be a scalar, got shape {jnp.shape(fovy)}")
  checks.check_range("fovy", fovy, 0.0, 180.0, True, True)
  aspect = checks.check_number("aspect", aspect, 0.0, np.inf)
  near = checks.check_number("near", near, 0.0, np.inf)
  far = checks.check_number("far", far, near, np.inf)

  dtype = jnp.result_type(verts.dtype, c2w.dtype)
  rot = c2w[:3, :3].astype(dtype)  # [3, 3], columns = camera axes in world.
  rel = verts.astype(dtype) - c2w[:3, 3].astype(dtype)  # [V, 3]
  cam = jnp.einsum("vi,ij->vj", rel, rot, precision=jax.lax.Precision.HIGHEST)  # [V, 3]
  f = 1.0 / jnp.tan(0.5 * jnp.deg2rad(jnp.asarray(fovy, dtype)))
  a = (far + near) / (near - far)
  b = 2.0 * far * near / (near - far)
  x = f / aspect * cam[:, 0]
  y = f * cam[:, 1]
  z = a * cam[:, 2] + b
  return jnp.stack([x, y, z, -cam[:, 2]], axis=-1)  # [V, 4]


def _screen(clip: jnp.ndarray, height: int, width: int):
  """Pixel coordinates (u [V], v [V]) of clip points; (0, 0) where W <= 0."""
  w = clip[:, 3]
  ok = w > 0
  inv = 1.0 / jnp.where(ok, w, 1.0)  # [V]
  u = jnp.where(ok, (clip[:, 0] * inv + 1.0) * (0.5 * width), 0.0)
  v = jnp.where(ok, (1.0 - clip[:, 1] * inv) * (0.5 * height), 0.0)
  return u, v


def _check_levels(levels, large) -> Tuple[Tuple[Tuple[int, int], ...], int]:
  """Validated ((tile, K), ...) and the whole-image K."""
  try:
    pairs = tuple((t, k) for t, k in levels)
  except (TypeError, ValueError) as e:
    raise ValueError(f"levels must be a sequence of (tile, K) pairs, got {levels!r}") from e
  if not pairs:
    raise ValueError("levels must hold at least one (tile, K) pair")
  out = []
  for i, (tile, k) in enumerate(pairs):
    tile = checks.check_int(f"levels[{i}] tile", tile)
    k = checks.check_int(f"levels[{i}] K", k)
    if out and tile % out[-1][0]:
      raise ValueError(
        f"levels[{i}] tile ({tile}) must be a multiple of levels[{i - 1}] tile ({out[-1][0]})"
      )
    out.append((tile, k))
  return tuple(out), checks.check_int("large", large)


def rasterize(
  clip,
  faces,
  face_mask,
  height: int,
  width: int,
  levels: Sequence[Tuple[int, int]] = DEFAULT_LEVELS,
  large: int = DEFAULT_LARGE,
  cull_back: bool = False,
) -> Raster:
  """The face seen at each pixel centre, by tile binning (see the module docstring).

  Args:
    clip: [V, 4] clip-space vertices (`project`); no gradient flows back.
    faces: [F, 3] vertex indices.
    face_mask: [F] bool, faces to draw.
    height: H, image rows.
    width: W, image columns.
    levels: ((tile, K), ...) finest first: tile side in pixels (each a
      multiple of the previous) and the most candidates kept per tile.
    large: the most faces kept that are too large for the coarsest level
      (their box touches more than 2 x 2 of its tiles); they are tested at
      every pixel.
    cull_back: skip faces that are clockwise on screen (back faces of a mesh
      with counter-clockwise outward faces); a closed mesh seen from outside
      looks the same and its tiles hold about half the candidates.

  Returns:
    Raster (tri_id [H, W], depth [H, W] and the overflow counts).
  """
  clip, faces = _check_mesh(clip, faces)
  face_mask = _check_face_mask(face_mask, faces.shape[0])
  height = checks.check_int("height", height)
  width = checks.check_int("width", width)
  levels, large = _check_levels(levels, large)
  if not isinstance(cull_back, bool):
    raise ValueError(f"cull_back must be a bool, got {cull_back!r}")
  return _rasterize(clip, faces, face_mask, height, width, levels, large, cull_back)


def _face_setup(clip, faces, face_mask, height, width, cull_back):
  """Per-face data of the inside test and the pixel boxes.

  Returns:
    data: [F, 15] per edge e (columns e, 3 + e, ...): u_a, v_a, s (u_b - u_a),
      s (v_b - v_a) with a < b by vertex id and s = +-1 the sign of the face's
      own order of the two, and 1 / W of the opposite vertex e.
    drawn: [F] bool, faces that pass the culling tests.
    box: [F, 4] int32 first / last pixel column and row the face may cover.
    zmin: [F] smallest vertex depth W.
  """
  u, v = _screen(clip, height, width)  # [V]
  w = clip[:, 3]
  in_front = (clip[:, 2] >= -w) & (w > 0) & jnp.all(jnp.isfinite(clip), axis=-1)  # [V]
  inv_w = 1.0 / jnp.where(in_front, w, 1.0)  # [V]

  va, vb = faces[:, _NEXT], faces[:, _PREV]  # [F, 3] edge endpoints.
  swap = va > vb
  lo, hi = jnp.where(swap, vb, va), jnp.where(swap, va, vb)  # [F, 3]
  # Negating both differences negates E exactly (rounding is symmetric).
  sign = jnp.where(swap, -1.0, 1.0).astype(clip.dtype)
  du, dv = sign * (u[hi] - u[lo]), sign * (v[hi] - v[lo])  # [F, 3]
  data = jnp.concatenate([u[lo], v[lo], du, dv, inv_w[faces]], axis=-1)  # [F, 15]

  fu, fv = u[faces], v[faces]  # [F, 3]
  area2 = (fu[:, 1] - fu[:, 0]) * (fv[:, 2] - fv[:, 0]) - (fv[:, 1] - fv[:, 0]) * (
    fu[:, 2] - fu[:, 0]
  )  # [F]
  # A counter-clockwise face in NDC (y up) is clockwise in pixels (v down): area2 < 0.
  drawn = (
    face_mask & jnp.all(in_front[faces], axis=-1) & ((area2 < 0) if cull_back else (area2 != 0))
  )

  def span(lo_f, hi_f, size):
    # Pixel centres k + 0.5 in [lo_f, hi_f], clipped to [0, size - 1].
    lo_f = jnp.clip(lo_f - 0.5 - _BOX_EPS, -2.0, size + 2.0)
    hi_f = jnp.clip(hi_f - 0.5 + _BOX_EPS, -2.0, size + 2.0)
    first = jnp.maximum(jnp.ceil(lo_f).astype(jnp.int32), 0)
    last = jnp.minimum(jnp.floor(hi_f).astype(jnp.int32), size - 1)
    return first, last

  j0, j1 = span(jnp.min(fu, -1), jnp.max(fu, -1), width)
  i0, i1 = span(jnp.min(fv, -1), jnp.max(fv, -1), height)
  drawn = drawn & (j0 <= j1) & (i0 <= i1)
  box = jnp.stack([j0, j1, i0, i1], axis=-1)  # [F, 4]
  zmin = jnp.min(w[faces], axis=-1)  # [F]
  return data, drawn, box, zmin


def _pick(a, b):
  """The nearer of two (1 / W, face id) pairs: larger 1 / W, ties to the lower id."""
  take_a = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
  return jnp.where(take_a, a[0], b[0]), jnp.where(take_a, a[1], b[1])


def _nearest(data, cand, px, py, best):
  """Merges the candidates that cover each pixel centre into `best`.

  Args:
    data: [F, 15] `_face_setup` data.
    cand: [N, K] candidate face ids, -1 for none.
    px, py: [N, P] pixel-centre coordinates.
    best: (inv_w [N, P], face [N, P] int32): 1 / W and id of the nearest face
      so far (inv_w < 0 where none).

  Returns:
    `best` updated with the candidates.
  """
  d = data[jnp.maximum(cand, 0)][:, None]  # [N, 1, K, 15]
  px, py = px[..., None], py[..., None]  # [N, P, 1]
  e = [
    d[..., 6 + k] * (py - d[..., 3 + k]) - d[..., 9 + k] * (px - d[..., k]) for k in range(3)
  ]  # 3 x [N, P, K]: E_e of the module docstring.
  total = e[0] + e[1] + e[2]
  inside = ((e[0] >= 0) & (e[1] >= 0) & (e[2] >= 0)) | ((e[0] <= 0) & (e[1] <= 0) & (e[2] <= 0))
  hit = inside & (total != 0) & (cand[:, None, :] >= 0)  # [N, P, K]
  num = e[0] * d[..., 12] + e[1] * d[..., 13] + e[2] * d[..., 14]
  inv_w = jnp.where(hit, num / jnp.where(hit, total, 1.0), -1.0)  # [N, P, K]
  ids = jnp.broadcast_to(cand[:, None, :], inv_w.shape)
  init = (jnp.array(-2.0, inv_w.dtype), jnp.array(_INT_MAX, jnp.int32))
  return _pick(best, jax.lax.reduce((inv_w, ids), init, _pick, (2,)))  # [N, P] each


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _rasterize(clip, faces, face_mask, height, width, levels, large, cull_back):
  """rasterize's maths on validated inputs."""
  clip = jax.lax.stop_gradient(clip)
  n_faces = faces.shape[0]
  data, drawn, box, zmin = _face_setup(clip, faces, face_mask, height, width, cull_back)

  # Levels: the given ones, then one tile holding the whole image.
  coarsest = levels[-1][0]
  whole = coarsest * -(-max(height, width) // coarsest)
  tiles = [t for t, _ in levels] + [whole]
  ks = [k for _, k in levels] + [large]
  nx = [-(-width // t) for t in tiles]
  ny = [-(-height // t) for t in tiles]
  counts_per_level = [a * b for a, b in zip(nx, ny)]
  offsets = np.concatenate([[0], np.cumsum(counts_per_level)]).astype(np.int32)
  n_tiles = int(offsets[-1])

  # Level of each face: the finest where its box touches at most 2 x 2 tiles.
  j0, j1, i0, i1 = (box[:, k] for k in range(4))  # [F]
  tile_arr = jnp.array(tiles, jnp.int32)[:, None]  # [L + 1, 1]
  fits = (j1 // tile_arr - j0 // tile_arr <= 1) & (i1 // tile_arr - i0 // tile_arr <= 1)
  level = jnp.argmax(fits, axis=0)  # [F], the last level always fits.
  t = jnp.array(tiles, jnp.int32)[level]  # [F]
  tx0, ty0 = j0 // t, i0 // t
  ntx, nty = j1 // t - tx0 + 1, i1 // t - ty0 + 1  # [F], each 1 or 2.
  sx = jnp.array([0, 1, 0, 1], jnp.int32)  # [S]
  sy = jnp.array([0, 0, 1, 1], jnp.int32)  # [S]
  tile_id = (
    jnp.array(offsets[:-1])[level][:, None]
    + (ty0[:, None] + sy) * jnp.array(nx, jnp.int32)[level][:, None]
    + tx0[:, None]
    + sx
  )  # [F, S]
  used = drawn[:, None] & (sx < ntx[:, None]) & (sy < nty[:, None])  # [F, S]
  keys = jnp.where(used, tile_id, n_tiles).reshape(-1)  # [F S]
  depth_key = jnp.broadcast_to(zmin[:, None], used.shape).reshape(-1)
  face_ids = jnp.broadcast_to(jnp.arange(n_faces, dtype=jnp.int32)[:, None], used.shape)
  keys, _, sorted_faces = jax.lax.sort(
    (keys, depth_key, face_ids.reshape(-1)), num_keys=2, is_stable=False
  )
  starts = jnp.searchsorted(keys, jnp.arange(n_tiles + 1, dtype=jnp.int32)).astype(jnp.int32)
  counts = starts[1:] - starts[:-1]  # [n_tiles]

  # Each level's candidates, tested in chunks of _CHUNK up to its fullest tile.
  t0 = tiles[0]
  fy, fx = np.meshgrid(np.arange(ny[0]), np.arange(nx[0]), indexing="ij")  # [ny0, nx0]
  local = np.arange(t0 * t0)
  px = jnp.asarray(fx.reshape(-1, 1) * t0 + local % t0 + 0.5, clip.dtype)  # [N0, P]
  py = jnp.asarray(fy.reshape(-1, 1) * t0 + local // t0 + 0.5, clip.dtype)
  best = (jnp.full(px.shape, -2.0, clip.dtype), jnp.full(px.shape, _INT_MAX, jnp.int32))
  overflow, dropped, fill = 0, 0, []
  for lvl, (tile, k) in enumerate(zip(tiles, ks)):
    lo, hi = int(offsets[lvl]), int(offsets[lvl + 1])
    start, count = starts[lo:hi], counts[lo:hi]  # [n_l]
    width_k = _CHUNK * -(-k // _CHUNK)
    slot = start[:, None] + jnp.arange(width_k, dtype=jnp.int32)  # [n_l, K']
    cand = sorted_faces[jnp.minimum(slot, keys.shape[0] - 1)]
    cand = jnp.where(jnp.arange(width_k) < jnp.minimum(count, k)[:, None], cand, -1)
    rows = jnp.asarray(((fy * t0 // tile) * nx[lvl] + fx * t0 // tile).reshape(-1))  # [N0]

    def chunk(c, best, cand=cand, rows=rows):
      part = jax.lax.dynamic_slice_in_dim(cand, c * _CHUNK, _CHUNK, axis=1)[rows]  # [N0, C]
      return _nearest(data, part, px, py, best)

    most = jnp.max(count)
    best = jax.lax.fori_loop(0, (jnp.minimum(most, k) + _CHUNK - 1) // _CHUNK, chunk, best)
    overflow += jnp.sum(count > k)
    dropped += jnp.sum(jnp.maximum(count - k, 0))
    fill.append(most)
  inv_w, tri = best
  tri = jnp.where(inv_w > 0, tri, -1)

  def image(x):
    # [N0, P] per tile -> [H, W].
    x = x.reshape(ny[0], nx[0], t0, t0).transpose(0, 2, 1, 3)
    return x.reshape(ny[0] * t0, nx[0] * t0)[:height, :width]

  tri, inv_w = image(tri), image(inv_w)
  depth = jnp.where(tri >= 0, 1.0 / jnp.where(tri >= 0, inv_w, 1.0), 0.0)
  return Raster(
    tri_id=tri,
    depth=depth,
    overflow=overflow.astype(jnp.int32),
    dropped=dropped.astype(jnp.int32),
    fill=jnp.stack(fill).astype(jnp.int32),
  )


def _pixel_ndc(height: int, width: int, dtype):
  """NDC of the pixel centres: x [1, W], y [H, 1]."""
  x = (2.0 * (jnp.arange(width, dtype=dtype) + 0.5) / width - 1.0)[None, :]
  y = (1.0 - 2.0 * (jnp.arange(height, dtype=dtype) + 0.5) / height)[:, None]
  return x, y


@jax.jit
def _barycentrics(clip, faces, tri_id):
  """Perspective-correct barycentrics [H, W, 3] at the pixel centres (module docstring)."""
  height, width = tri_id.shape
  c = clip[faces[jnp.maximum(tri_id, 0)]]  # [H, W, 3, 4]
  x, y = _pixel_ndc(height, width, clip.dtype)
  u = c[..., 0] - x[..., None] * c[..., 3]  # [H, W, 3]
  v = c[..., 1] - y[..., None] * c[..., 3]  # [H, W, 3]
  n = jnp.stack(
    [
      u[..., 1] * v[..., 2] - u[..., 2] * v[..., 1],
      u[..., 2] * v[..., 0] - u[..., 0] * v[..., 2],
      u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0],
    ],
    axis=-1,
  )  # [H, W, 3] = u x v
  total = jnp.sum(n, axis=-1, keepdims=True)  # [H, W, 1]
  ok = (tri_id[..., None] >= 0) & (total != 0)
  return jnp.where(ok, n / jnp.where(ok, total, 1.0), 0.0)


def barycentrics(clip, faces, tri_id, height: int, width: int) -> jnp.ndarray:
  """Differentiable perspective-correct barycentrics of the visible faces.

  Args:
    clip: [V, 4] clip-space vertices (gradients flow to them).
    faces: [F, 3] vertex indices.
    tri_id: [H, W] visible face per pixel (`Raster.tri_id`), -1 for background.
    height: H.
    width: W.

  Returns:
    bary: [H, W, 3] weights of the face's vertices (summing to 1), zeros at
      background pixels.
  """
  clip, faces = _check_mesh(clip, faces)
  height = checks.check_int("height", height)
  width = checks.check_int("width", width)
  tri_id = _check_tri_id(tri_id, height, width)
  return _barycentrics(clip, faces, tri_id)


def interpolate(attr, faces, tri_id, bary) -> jnp.ndarray:
  """Per-vertex attributes interpolated at the pixel centres.

  Args:
    attr: [V, C] per-vertex attributes.
    faces: [F, 3] vertex indices.
    tri_id: [H, W] visible face per pixel, -1 for background.
    bary: [H, W, 3] barycentrics (`barycentrics`).

  Returns:
    [H, W, C] sum_k bary_k attr[faces[tri_id, k]], zeros at background pixels.
  """
  attr = _float(attr)
  if attr.ndim != 2:
    raise ValueError(f"attr must have shape [V, C], got {attr.shape}")
  faces = _check_faces(faces, attr.shape[0])
  tri_id = _check_tri_id(tri_id)
  bary = _float(bary)
  if bary.shape != tri_id.shape + (3,):
    raise ValueError(f"bary must have shape {list(tri_id.shape) + [3]}, got {bary.shape}")
  return _interpolate(attr, faces, tri_id, bary)


@jax.jit
def _interpolate(attr, faces, tri_id, bary):
  """interpolate's maths on validated inputs."""
  a = attr[faces[jnp.maximum(tri_id, 0)]]  # [H, W, 3, C]
  out = jnp.sum(bary[..., None].astype(a.dtype) * a, axis=-2)  # [H, W, C]
  return jnp.where(tri_id[..., None] >= 0, out, 0.0)


def _edge_neighbours(faces, face_mask):
  """The face across each edge, from the sorted (min, max) vertex-id keys.

  Args:
    faces: [F, 3] vertex indices; edge e joins vertices (e + 1, e + 2) mod 3.
    face_mask: [F] bool; masked faces have no neighbours and are none.

  Returns:
    [F, 3] int32 half-edge index 3 f' + e' of the neighbour's matching edge,
    -1 for an edge of one face or of three or more (non-manifold).
  """
  n = 3 * faces.shape[0]
  va, vb = faces[:, _NEXT].reshape(-1), faces[:, _PREV].reshape(-1)  # [3F]
  valid = jnp.repeat(face_mask, 3)  # [3F]
  lo = jnp.where(valid, jnp.minimum(va, vb), _INT_MAX)
  hi = jnp.where(valid, jnp.maximum(va, vb), _INT_MAX)
  lo, hi, half = jax.lax.sort((lo, hi, jnp.arange(n, dtype=jnp.int32)), num_keys=2)
  same = (lo[1:] == lo[:-1]) & (hi[1:] == hi[:-1]) & (lo[1:] != _INT_MAX)  # [3F - 1]: s ~ s + 1.
  pad = jnp.zeros((1,), bool)
  same_prev = jnp.concatenate([pad, same])  # [3F]: s ~ s - 1.
  same_next = jnp.concatenate([same, pad])  # [3F]: s ~ s + 1.
  # A key shared by exactly two half-edges: s ~ s + 1, and neither s - 1 nor s + 2 joins.
  first = same_next & ~same_prev & ~jnp.concatenate([same[1:], pad, pad])
  second = jnp.concatenate([pad, first[:-1]])
  partner = jnp.where(
    first,
    jnp.roll(half, -1),
    jnp.where(second, jnp.roll(half, 1), -1),
  )  # [3F] in sorted order.
  return jnp.full((n,), -1, jnp.int32).at[half].set(partner).reshape(-1, 3)


def _det3(p, q, r):
  """p . (q x r) over the last axis [..., 3]."""
  return (
    p[..., 0] * (q[..., 1] * r[..., 2] - q[..., 2] * r[..., 1])
    + p[..., 1] * (q[..., 2] * r[..., 0] - q[..., 0] * r[..., 2])
    + p[..., 2] * (q[..., 0] * r[..., 1] - q[..., 1] * r[..., 0])
  )


def _silhouette_edges(clip, faces, face_mask):
  """Edge neighbours and silhouette flags.

  Returns:
    nb: [F, 3] `_edge_neighbours`.
    sil: [F, 3] bool, edge e of face f is a boundary or the surface folds
      behind it (the neighbour's third vertex on the side of f's own).
  """
  nb = _edge_neighbours(faces, face_mask)  # [F, 3]
  h = clip[:, (0, 1, 3)]  # [V, 3] homogeneous 2D (X, Y, W).
  a, b = h[faces[:, _NEXT]], h[faces[:, _PREV]]  # [F, 3, 3]
  own = _det3(a, b, h[faces])  # [F, 3]
  safe = jnp.maximum(nb, 0)
  other = _det3(a, b, h[faces[safe // 3, safe % 3]])  # [F, 3]
  return nb, (nb < 0) | (own * other > 0)


def _walk(face, start, sign, centre, along, across, faces, nb, sil, max_hops):
  """The silhouette edge that the segment from a pixel centre to its neighbour's crosses.

  From the occluder face, the walk leaves each face through the edge that the
  row (v = centre) crosses ahead (the farthest crossing, in the direction
  `sign`, other than the entry edge) and enters the neighbour there, until
  the edge is a silhouette. It fails if the crossing lies beyond the
  neighbouring pixel's centre or no silhouette is met within max_hops faces.

  Args:
    face: [N, M] occluder faces.
    start: [N, M] coordinate `along` of the occluder pixel's centre.
    sign: [N, M] +1 to walk towards larger `along`, -1 towards smaller.
    centre: [N, 1] the row's coordinate `across`.
    along, across: [V] vertex pixel coordinates (no gradient).
    faces, nb, sil: the mesh, `_edge_neighbours` and silhouette flags.
    max_hops: most faces visited.

  Returns:
    face: [N, M] face of the silhouette edge.
    edge: [N, M] int32 its index in the face.
    found: [N, M] bool.
  """
  eps = 1.0 / 16.0  # tolerated rounding of a crossing, pixels.

  def step(state):
    hop, face, entry, edge, status = state  # status 0: walking, 1: found, 2: failed
    vid = faces[face]  # [N, M, 3]
    ua, ub = along[vid[..., _NEXT]], along[vid[..., _PREV]]  # [N, M, 3]
    va, vb = across[vid[..., _NEXT]], across[vid[..., _PREV]]
    c = centre[..., None]
    straddle = ((va - c) * (vb - c) <= 0) & (va != vb) & (jnp.arange(3) != entry[..., None])
    cross = ua + (c - va) * (ub - ua) / jnp.where(va != vb, vb - va, 1.0)
    ahead = jnp.where(straddle, sign[..., None] * (cross - start[..., None]), -jnp.inf)
    exit_edge = jnp.argmax(ahead, axis=-1).astype(jnp.int32)  # [N, M]
    reach = jnp.max(ahead, axis=-1)  # [N, M]
    walking = status == 0
    silhouette = jnp.take_along_axis(sil[face], exit_edge[..., None], -1)[..., 0]
    new = jnp.where((reach == -jnp.inf) | (reach > 1.0 + eps), 2, jnp.where(silhouette, 1, 0))
    status = jnp.where(walking, new, status)
    half = jnp.take_along_axis(nb[face], exit_edge[..., None], -1)[..., 0]  # [N, M]
    move = walking & (status == 0)
    face = jnp.where(move, jnp.maximum(half, 0) // 3, face)
    entry = jnp.where(move, jnp.maximum(half, 0) % 3, entry)
    edge = jnp.where(walking & (status == 1), exit_edge, edge)
    return hop + 1, face, entry, edge, status

  def walking(state):
    return (state[0] < max_hops) & jnp.any(state[4] == 0)

  minus = jnp.full(face.shape, -1, jnp.int32)
  state = (0, face, minus, jnp.zeros_like(minus), jnp.zeros_like(minus))
  _, face, _, edge, status = jax.lax.while_loop(walking, step, state)
  return face, edge, status == 1


def _pair_deltas(color, tri, depth, along, across, faces, nb, sil, max_hops):
  """Colour changes from the pairs (i, j)-(i, j + 1) of the module docstring.

  Args:
    color: [H, W, C] colours.
    tri: [H, W] visible face, -1 for background.
    depth: [H, W] depth W of the visible surface.
    along: [V] vertex pixel coordinate along the rows (u), differentiable.
    across: [V] vertex pixel coordinate across the rows (v), differentiable.
    faces: [F, 3] vertex indices.
    nb: [F, 3] edge neighbours.
    sil: [F, 3] silhouette edges.
    max_hops: most faces a walk visits.

  Returns:
    (delta_left [H, W - 1, C], delta_right [H, W - 1, C]): changes of the
    left and right pixel of each pair.
  """
  sg = jax.lax.stop_gradient
  height, width = tri.shape
  tp, tq = tri[:, :-1], tri[:, 1:]  # [H, W - 1]
  occ_left = (tq < 0) | ((tp >= 0) & (depth[:, :-1] <= depth[:, 1:]))
  occluder = jnp.where(occ_left, tp, tq)
  active = (tp != tq) & (occluder >= 0)
  centre = (jnp.arange(height, dtype=along.dtype) + 0.5)[:, None]  # [H, 1] row centres
  left_centre = jnp.arange(width - 1, dtype=along.dtype) + 0.5  # [W - 1]
  start = left_centre + jnp.where(occ_left, 0.0, 1.0)  # [H, W - 1] occluder centre
  sign = jnp.where(occ_left, 1.0, -1.0).astype(along.dtype)
  face, edge, found = _walk(
    jnp.maximum(occluder, 0), start, sign, centre, sg(along), sg(across), faces, nb, sil, max_hops
  )
  vid = faces[face]  # [H, W - 1, 3]
  a = jnp.take_along_axis(vid, (edge + 1)[..., None] % 3, -1)[..., 0]  # [H, W - 1]
  b = jnp.take_along_axis(vid, (edge + 2)[..., None] % 3, -1)[..., 0]
  ua, ub, va, vb = along[a], along[b], across[a], across[b]  # differentiable
  dv = vb - va
  steep = sg(jnp.abs(dv) > jnp.abs(ub - ua))
  cross = ua + (centre - va) * (ub - ua) / jnp.where(dv != 0, dv, 1.0)
  t = jnp.clip(sign * (cross - start), 0.0, 1.0)  # [H, W - 1] from the occluder's centre
  use = active & found & steep
  near_half = sg(t) < 0.5
  a_occ = jnp.where(use & near_half, 0.5 - t, 0.0)[..., None]  # [H, W - 1, 1]
  a_other = jnp.where(use & ~near_half, t - 0.5, 0.0)[..., None]
  cl, cr = color[:, :-1], color[:, 1:]  # [H, W - 1, C]
  diff = cr - cl
  # Occluder left: left += a_occ (cr - cl), right += a_other (cl - cr); mirrored otherwise.
  left = jnp.where(occ_left[..., None], a_occ, a_other) * diff
  right = -jnp.where(occ_left[..., None], a_other, a_occ) * diff
  return left, right


@functools.partial(jax.jit, static_argnums=5)
def _antialias(color, clip, faces, face_mask, tri_id, max_hops):
  """antialias's maths on validated inputs."""
  height, width = tri_id.shape
  const = jax.lax.stop_gradient(clip)
  nb, sil = _silhouette_edges(const, faces, face_mask)  # [F, 3]
  bary = _barycentrics(const, faces, tri_id)  # [H, W, 3]
  depth = jnp.sum(bary * const[faces[jnp.maximum(tri_id, 0)], 3], axis=-1)  # [H, W]
  u, v = _screen(clip, height, width)  # [V], differentiable.
  out = color
  if width > 1:
    left, right = _pair_deltas(color, tri_id, depth, u, v, faces, nb, sil, max_hops)
    out = out + jnp.pad(left, ((0, 0), (0, 1), (0, 0))) + jnp.pad(right, ((0, 0), (1, 0), (0, 0)))
  if height > 1:
    swap = lambda x: jnp.swapaxes(x, 0, 1)
    up, down = _pair_deltas(swap(color), swap(tri_id), swap(depth), v, u, faces, nb, sil, max_hops)
    out = out + swap(
      jnp.pad(up, ((0, 0), (0, 1), (0, 0))) + jnp.pad(down, ((0, 0), (1, 0), (0, 0)))
    )
  return out


def antialias(
  color, clip, faces, face_mask, tri_id, max_hops: int = DEFAULT_MAX_HOPS
) -> jnp.ndarray:
  """Analytic silhouette antialiasing (see the module docstring).

  Args:
    color: [H, W, C] shaded image (background composited).
    clip: [V, 4] clip-space vertices; gradients flow to them at silhouettes.
    faces: [F, 3] vertex indices.
    face_mask: [F] bool, the faces that were drawn (others are not neighbours).
    tri_id: [H, W] visible face per pixel (`Raster.tri_id`), -1 for background.
    max_hops: most faces crossed between two pixel centres in search of the
      silhouette edge (thin faces along a silhouette hold no pixel centre).

  Returns:
    [H, W, C] colours with the pixels along silhouette edges blended.
  """
  clip, faces = _check_mesh(clip, faces)
  face_mask = _check_face_mask(face_mask, faces.shape[0])
  color = _float(color)
  if color.ndim != 3:
    raise ValueError(f"color must have shape [H, W, C], got {color.shape}")
  tri_id = _check_tri_id(tri_id, *color.shape[:2])
  max_hops = checks.check_int("max_hops", max_hops)
  return _antialias(color, clip, faces, face_mask, tri_id, max_hops)
