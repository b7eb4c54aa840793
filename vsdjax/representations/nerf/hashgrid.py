"""Instant-NGP multiresolution hash encoding (Müller et al., 2022) in pure JAX.

3D inputs, trilinear interpolation; the level layout, hashing and table rows
are those of tiny-cuda-nn's `GridEncoding`:

- Level l (0-based) has
      scale_l      = base_resolution * per_level_scale**l - 1,
      resolution_l = ceil(scale_l) + 1,
      size_l       = min(T, next multiple of 8 of resolution_l**3),
  with T = 2**log2_table_size. A point x in [0, 1]^3 (inputs outside are
  clamped) sits at the continuous grid position pos = x * scale_l + 0.5, in
  the cell floor(pos), with trilinear weights from frac = pos - floor(pos).
- The table row of an integer corner c = (c0, c1, c2) is, modulo size_l:
  dense (row-major, c0 fastest) c0 + c1 * res + c2 * res**2 where
  resolution_l**3 <= T, else the spatial hash
  (c0 * 1) xor (c1 * 2654435761) xor (c2 * 805459861) in uint32 arithmetic.
  When scale_l is an integer or frac(scale_l) >= 0.5, the upper corner of the
  last cell along an axis (points with x * scale_l + 0.5 > ceil(scale_l),
  near x = 1) has coordinate resolution_l, one past the dense grid; its row
  is the same formula's (row-major overflow, then modulo size_l).
- Every level owns a [T, F] slice of one [L, T, F] table; rows >= size_l of a
  dense level are never read and get zero gradient. Initialisation is
  uniform in [-init_scale, init_scale].
- The output concatenates levels in order, [level 0 features, level 1
  features, ...], i.e. [..., L * F] with feature f of level l at l * F + f.

scale_l is computed in float64. All levels are handled by one gather of
[8, L, N] rows per feature, so the backward pass w.r.t. the tables is one
scatter-add per feature. Reverse mode keeps the [8, L, N] rows and weights
(64 bytes per point and level), so differentiate through `encode` in chunks of
points (the volume renderer's rematerialised scan does).
"""

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks

# Instant-NGP's hashing primes, one per dimension.
_PRIMES = (1, 2654435761, 805459861)
# [8, 3] corner offsets of a cell; corner k has offset (k >> d) & 1 along dim d.
_CORNERS = np.array([[(k >> d) & 1 for d in range(3)] for k in range(8)], dtype=np.uint32)


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """Static settings of the hash grid (defaults: ProlificDreamer's setting).

  Attributes:
    n_levels: number of resolution levels L.
    n_features: features per level F.
    log2_table_size: log2 of the rows T per level.
    base_resolution: resolution of the coarsest level (>= 2).
    per_level_scale: growth factor of the scale from one level to the next.
    init_scale: tables start uniform in [-init_scale, init_scale].
  """

  n_levels: int = 16
  n_features: int = 2
  log2_table_size: int = 19
  base_resolution: int = 16
  per_level_scale: float = 1.447269
  init_scale: float = 1e-4

  def __post_init__(self):
    checks.check_fields(
      self,
      n_levels=checks.integer(1),
      n_features=checks.integer(1),
      log2_table_size=checks.integer(3, 30),
      base_resolution=checks.integer(2),
      per_level_scale=checks.number(1.0),
      init_scale=checks.NONNEGATIVE,
    )
    if self.n_levels << self.log2_table_size > 2**31 - 1:
      raise ValueError(
        "GridSpec.n_levels * 2**log2_table_size must fit in int32, got "
        f"{self.n_levels} * 2**{self.log2_table_size}"
      )
    top = levels(self).resolution[-1]
    if top >= 2**31:
      raise ValueError(f"GridSpec gives a finest resolution of {top}, beyond uint32 maths")

  @property
  def table_size(self) -> int:
    """Rows T per level."""
    return 2**self.log2_table_size

  @property
  def n_output(self) -> int:
    """Width L * F of the encoding."""
    return self.n_levels * self.n_features


class Levels(NamedTuple):
  """Per-level layout (numpy, static), each [L]."""

  scale: np.ndarray  # float64, scale_l = base * per_level_scale**l - 1.
  resolution: np.ndarray  # int64, ceil(scale_l) + 1.
  size: np.ndarray  # int64, rows used: min(T, ceil8(resolution**3)).
  dense: np.ndarray  # bool, resolution**3 <= T (else hashed).


def levels(spec: GridSpec) -> Levels:
  """The static layout of every level of `spec` (see the module docstring)."""
  l = np.arange(spec.n_levels, dtype=np.float64)
  scale = spec.base_resolution * spec.per_level_scale**l - 1.0
  resolution = np.ceil(scale).astype(np.int64) + 1
  cells = resolution.astype(np.float64) ** 3  # float: no int64 overflow.
  t = spec.table_size
  size = np.minimum(t, 8 * np.ceil(cells / 8))
  return Levels(scale=scale, resolution=resolution, size=size.astype(np.int64), dense=cells <= t)


def init(key: jax.Array, spec: GridSpec) -> dict:
  """Initial hash-grid parameters.

  Args:
    key: PRNG key.
    spec: grid settings.

  Returns:
    {'tables': [L, T, F] float32}, uniform in [-init_scale, init_scale].
  """
  shape = (spec.n_levels, spec.table_size, spec.n_features)
  tables = jax.random.uniform(key, shape, jnp.float32, -spec.init_scale, spec.init_scale)
  return {"tables": tables}


def corners(x: jnp.ndarray, spec: GridSpec) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The 8 cell corners of every point and level: their rows and trilinear weights.

  Points are the last (minor) axis of every array here and in `encode`: a TPU
  tiles the two minor axes of an array by (8, 128), so [N, L, 8] would pad its
  8 corners to 128 lanes (16x the bytes), while [8, L, N] is dense.

  Args:
    x: [N, 3] positions in the unit cube [0, 1]^3 (clamped to it), float.
    spec: grid settings.

  Returns:
    row: [8, L, N] int32, each corner's row within its level (< size_l).
    weights: [8, L, N] in the dtype of `x`, summing to 1 over the corners.
  """
  lv = levels(spec)
  x = jnp.clip(x, 0.0, 1.0).T  # [3, N]
  scale = jnp.asarray(lv.scale[:, None], x.dtype)  # [L, 1]
  pos = x[:, None, :] * scale + 0.5  # [3, L, N]
  cell = jnp.floor(pos)
  frac = pos - cell  # [3, L, N]
  lower = cell.astype(jnp.uint32)  # [3, L, N]
  res = jnp.asarray(lv.resolution[:, None], jnp.uint32)  # [L, 1]
  size = jnp.asarray(lv.size[:, None], jnp.uint32)  # [L, 1]
  dense = jnp.asarray(lv.dense[:, None])  # [L, 1]
  rows, weights = [], []
  for offset in _CORNERS:  # Corner offsets (o0, o1, o2) in {0, 1}^3.
    c0, c1, c2 = (lower[d] + offset[d] for d in range(3))  # [L, N] each
    dense_row = c0 + c1 * res + c2 * (res * res)
    hashed_row = (
      c0 * jnp.uint32(_PRIMES[0]) ^ c1 * jnp.uint32(_PRIMES[1]) ^ c2 * jnp.uint32(_PRIMES[2])
    )
    rows.append(jnp.where(dense, dense_row, hashed_row) % size)
    # Trilinear weight: product over dims of frac (offset 1) or 1 - frac.
    w0, w1, w2 = (frac[d] if offset[d] else 1.0 - frac[d] for d in range(3))
    weights.append(w0 * w1 * w2)
  return jnp.stack(rows).astype(jnp.int32), jnp.stack(weights)


def encode(params: dict, x: jnp.ndarray, spec: GridSpec) -> jnp.ndarray:
  """Encodes positions with the multiresolution hash grid.

  Args:
    params: {'tables': [L, T, F]} from `init`.
    x: [..., 3] positions in the unit cube [0, 1]^3 (clamped to it).
    spec: grid settings matching `params`.

  Returns:
    [..., L * F] interpolated features, level-major, in the dtype of
    `x` and the tables promoted together. Differentiable w.r.t. the tables and
    w.r.t. `x` (piecewise trilinear; the gradient is zero outside the cube).
  """
  tables = jnp.asarray(params["tables"])  # [L, T, F]
  n_levels, t, n_features = spec.n_levels, spec.table_size, spec.n_features
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, tables.dtype)
  batch_shape = x.shape[:-1]
  row, weights = corners(x.astype(dtype).reshape(-1, 3), spec)  # [8, L, N] each
  level_start = jnp.asarray(np.arange(n_levels)[:, None] * t, jnp.int32)  # [L, 1]
  flat_row = row + level_start  # [8, L, N]
  out = []
  for f in range(n_features):  # One scalar gather per feature (a [.., F] row pads on TPUs).
    column = tables[..., f].astype(dtype).reshape(n_levels * t)
    feats = column.at[flat_row].get(mode="promise_in_bounds")  # [8, L, N]
    # The 8 corners' sum written out: elementwise work that XLA fuses on every backend.
    # (jnp.sum over the corner axis ran as a slow reduction on XLA:CPU, the render's
    # largest cost; an einsum is a dot that GPUs would not strength-reduce.)
    out.append(sum(weights[c] * feats[c] for c in range(8)))  # [L, N]
  out = jnp.stack(out, axis=-1)  # [L, N, F]
  return out.transpose(1, 0, 2).reshape(*batch_shape, n_levels * n_features)


# XLA:GPU in jaxlib 0.10.2 - 0.11.0 runs float32 scatter-adds as a compare-and-
# swap loop that collapses when many updates hit one row (jax-ml/jax#38806):
# the backward of `encode` on its coarse levels. This flag (set before jax
# starts its backend) restores the native atomic, flushing denormals in it.
FTZ_ATOMICS_FLAG = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"


def slow_scatter_warning(backend: str, jaxlib_version: str, xla_flags: str) -> str | None:
  """The advice for a GPU whose jaxlib has the slow scatter-add, or None.

  Args:
    backend: jax.default_backend() ("gpu", "cpu", "tpu").
    jaxlib_version: e.g. "0.10.2" (a suffix such as ".dev2026" is ignored).
    xla_flags: the XLA_FLAGS environment variable ("" when unset).
  """
  release = tuple(int(p) for p in re.findall(r"\d+", jaxlib_version)[:3])
  if backend != "gpu" or not (0, 10, 2) <= release <= (0, 11, 0) or FTZ_ATOMICS_FLAG in xla_flags:
    return None
  return (
    f"jaxlib {jaxlib_version} makes the hash grid's backward slow on GPUs (jax-ml/jax#38806); "
    "on Python >= 3.12 install jax 0.11.2 (pip install -e .), or set "
    f'XLA_FLAGS={FTZ_ATOMICS_FLAG} before starting (benchmarks/README.md, "Which jax")'
  )
