"""Evaluation against the analytic prior's known references (eval.json).

With the analytic prior the target distribution is known: a mixture of K
reference images per camera (mixture.py). Each particle
is compared with each reference by PSNR and assigned to the nearest one; the
set of references that are nearest to some particle measures how well the
particles cover the modes (VSD should spread over them, SDS tends to
collapse).

Conventions:
  - PSNR is in dB on rgb in [0, 1]: PSNR = -10 log10(MSE), with the MSE
    floored at MSE_FLOOR (so PSNR <= 100 dB and the JSON stays finite).
  - 3D: the particles are rendered with `scene.render_camera(key=None)` (as
    trained: their own background) and the references with
    `shapes.render_views` (white background) from the same held-out cameras
    (`heldout_cameras`). The MSE of a pair is the mean over cameras of the
    per-camera MSE (mean over pixels and channels); PSNR is taken of that.
  - 2D: images are x0 [3, h, w]; rgb = clip((x0 + 1) / 2, 0, 1) on both sides.
  - Names: references are named by their shape (3D) or by the names given
    (2D); the j-th repeat of a name (j >= 2) is called "name#j", e.g.
    ("sphere", "cube", "sphere") -> ("sphere", "cube", "sphere#2").
  - Ties go to the first reference.
  - The result dicts hold plain Python values, ready for `write_json`:
      {"references": [names],
       "particles": [{"nearest": name, "psnr": float,
                      "psnr_to": {name: float}}, ...],
       "covered": sorted names nearest to at least one particle}
    plus "n_views" and "size" (3D) or "spread" and "sigma_ref" (2D).
"""

import json
import math
import os
import tempfile
from typing import Sequence

import jax
import numpy as np

from vsdjax import cameras, checks
from vsdjax.prior.analytic import shapes
from vsdjax.representations.nerf import export, scene

# Floor of the MSE in PSNR: 1e-10 -> at most 100 dB.
MSE_FLOOR = 1e-10

# The held-out cameras: inside the training ranges (defaults.py), at a fixed
# distance and field of view.
HELDOUT_RADIUS = 1.5
HELDOUT_FOVY = 45.0
HELDOUT_ELEVATION = (0.0, 30.0)


def heldout_cameras(n: int, seed: int = 12345) -> cameras.Cameras:
  """Fixed held-out cameras for evaluation.

  Elevations are drawn uniformly in HELDOUT_ELEVATION (degrees) by a numpy
  generator seeded with `seed`; azimuths are evenly spread,
  offset + 360 * i / n, with an offset between 1/4 and 3/4 of the spacing
  360 / n drawn by the same generator, so they never coincide with the
  export orbit of n views (cameras.orbit, azimuth 360 * i / n). Radius
  HELDOUT_RADIUS, fovy HELDOUT_FOVY. The same (n, seed) always gives the same
  cameras.

  Args:
    n: number of cameras.
    seed: integer seed.

  Returns:
    Cameras with leading shape [n] (azimuth wrapped to [-180, 180)).
  """
  n = checks.check_int("n", n)
  rng = np.random.default_rng(checks.check_int("seed", seed, 0))
  elevation = rng.uniform(*HELDOUT_ELEVATION, size=n)  # [n]
  spacing = 360.0 / n
  offset = (0.25 + 0.5 * rng.uniform()) * spacing
  azimuth = offset + spacing * np.arange(n)  # [n]
  azimuth = np.mod(azimuth + 180.0, 360.0) - 180.0
  return cameras.from_spherical(
    HELDOUT_RADIUS, elevation.astype(np.float32), azimuth.astype(np.float32), HELDOUT_FOVY
  )


def unique_names(names: Sequence[str]) -> list:
  """Names with repeats made unique: the j-th "a" (j >= 2) becomes "a#j"."""
  seen = {}
  out = []
  for name in names:
    seen[name] = seen.get(name, 0) + 1
    out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
  return out


def psnr(mse) -> np.ndarray:
  """PSNR (dB) of MSEs [...] of [0, 1] images, MSE floored at MSE_FLOOR."""
  return -10.0 * np.log10(np.maximum(np.asarray(mse, np.float64), MSE_FLOOR))


def summary(mse: np.ndarray, names: list) -> dict:
  """The "references", "particles" and "covered" entries from MSEs [n, K]."""
  values = psnr(mse)  # [n, K]
  nearest = np.argmax(values, axis=1)  # [n], ties to the first.
  particles = [
    {
      "nearest": names[k],
      "psnr": float(row[k]),
      "psnr_to": {name: float(v) for name, v in zip(names, row)},
    }
    for row, k in zip(values, nearest)
  ]
  return {
    "references": list(names),
    "particles": particles,
    "covered": sorted({names[k] for k in nearest}),
  }


def _check_references(refs) -> tuple:
  """refs (a Reference, a sequence of them or a 'shape:#rrggbb,...' string)."""
  if isinstance(refs, str):
    return shapes.parse_references(refs)
  if isinstance(refs, shapes.Reference):
    return (refs,)
  refs = tuple(refs)
  if not refs or not all(isinstance(r, shapes.Reference) for r in refs):
    raise ValueError(f"refs must be a non-empty sequence of shapes.Reference, got {refs!r}")
  return refs


def evaluate_3d(
  particles: dict,
  spec: scene.SceneSpec,
  refs,
  n_views: int = 8,
  size: int = 64,
  ray_batch: int = 4096,
  occupied=None,
) -> dict:
  """Held-out-view PSNR of each 3D particle to each reference.

  Args:
    particles: n particles stacked on a leading axis [n, ...].
    spec: their SceneSpec.
    refs: K shapes.Reference (or a 'shape:#rrggbb,...' string).
    n_views: number of held-out cameras (`heldout_cameras`).
    size: render size (square), pixels.
    ray_batch: rays rendered at a time (bounds memory).
    occupied: [n, G, G, G] bool occupancy grids of the particles, or None.

  Returns:
    The dict of the module docstring, with "n_views" and "size".
  """
  if not isinstance(spec, scene.SceneSpec):
    raise ValueError(f"spec must be a scene.SceneSpec, got {type(spec)}")
  refs = _check_references(refs)
  n_views = checks.check_int("n_views", n_views)
  size = checks.check_int("size", size)
  try:
    tables = np.shape(particles["field"]["grid"]["tables"])
  except (KeyError, TypeError) as e:
    raise ValueError(
      "particles must be stacked 3D particles {'field': ..., 'background': ...}"
    ) from e
  if len(tables) != 4:
    raise ValueError(
      "particles must carry a leading particle axis: "
      "particles['field']['grid']['tables'] must be "
      f"[n, L, T, F], got {tables}"
    )
  cams = heldout_cameras(n_views)
  ref_rgb = np.asarray(
    shapes.render_views(refs, cams.c2w, cams.fovy, size, size)["rgb"], np.float64
  )
  # ref_rgb: [V, K, H, W, 3].
  mse = []
  for i in range(tables[0]):
    particle = jax.tree.map(lambda v, i=i: v[i], particles)
    grid = None if occupied is None else occupied[i]
    rgb = export.render_views(particle, cams, spec, size, ray_batch, grid)  # [V, H, W, 3]
    rgb = rgb.astype(np.float64)
    err = np.square(rgb[:, None] - ref_rgb)  # [V, K, H, W, 3]
    mse.append(np.mean(np.mean(err, axis=(2, 3, 4)), axis=0))  # [K]
  out = summary(np.stack(mse), unique_names([r.shape for r in refs]))
  out.update(n_views=n_views, size=size)
  return out


def evaluate_2d(images, means, names: Sequence[str], sigma_ref: float) -> dict:
  """PSNR of 2D particles to the reference means, and their spread.

  VSD samples the target distribution: with one reference, N(m, sigma_ref^2 I)
  per pixel, its particles should have a spread close to sigma_ref (for n
  particles the expected ddof=0 std is a little lower, about
  sigma_ref * sqrt((n - 1) / n)). SDS seeks a mode, so its particles collapse
  onto the mean: spread ~ 0. With several references the spread also counts
  the distances between the particles' modes.

  Args:
    images: [n, 3, h, w] particles, x0 units.
    means: [K, 3, h, w] reference means, x0 units.
    names: K reference names.
    sigma_ref: the prior's std around each mean, x0 units (>= 0).

  Returns:
    The dict of the module docstring, with "spread" (mean over pixels and
    channels of the std across particles, x0 units, ddof=0) and "sigma_ref".
  """
  images = np.asarray(images, np.float64)
  means = np.asarray(means, np.float64)
  if images.ndim != 4 or images.shape[1] != 3:
    raise ValueError(f"images must be [n, 3, h, w], got {images.shape}")
  if means.ndim != 4 or means.shape[1:] != images.shape[1:]:
    raise ValueError(f"means must be [K, 3, h, w] = [K, *{images.shape[1:]}], got {means.shape}")
  checks.check_finite("images", images)
  checks.check_finite("means", means)
  if (
    isinstance(names, str)
    or len(names) != means.shape[0]
    or not all(isinstance(s, str) and s for s in names)
  ):
    raise ValueError(
      f"names must be {means.shape[0]} non-empty strings (one per mean), got {names!r}"
    )
  sigma_ref = checks.check_number("sigma_ref", sigma_ref, 0.0, math.inf, closed=True)

  def rgb(x):  # x0 [..., 3, h, w] -> rgb in [0, 1], same shape.
    return np.clip(0.5 * (x + 1.0), 0.0, 1.0)

  err = np.square(rgb(images)[:, None] - rgb(means)[None])  # [n, K, 3, h, w]
  out = summary(np.mean(err, axis=(2, 3, 4)), unique_names(list(names)))
  out.update(spread=float(np.mean(np.std(images, axis=0))), sigma_ref=sigma_ref)
  return out


def write_json(d: dict, path) -> str:
  """Writes `d` as JSON atomically (a temporary file, then os.replace).

  Args:
    d: JSON-serialisable dict (numpy scalars and arrays are converted);
      NaN and infinities are refused.
    path: the file; its folder is created if needed.

  Returns:
    path, as a str.
  """
  if not isinstance(d, dict):
    raise ValueError(f"d must be a dict, got {type(d)}")

  def default(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")

  try:
    text = json.dumps(d, indent=2, allow_nan=False, default=default)
  except (TypeError, ValueError) as e:
    raise ValueError(f"d cannot be written as JSON to {path}: {e}") from e
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600).
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
