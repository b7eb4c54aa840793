"""Tests of vsdjax.evaluate: held-out cameras, PSNR to references, eval.json."""

import json
import os

import jax
import numpy as np
import pytest

from helpers import random_particle
from vsdjax import cameras
from vsdjax.prior.analytic import evaluate, shapes
from vsdjax.representations.nerf import field as field_lib, hashgrid, render, scene

SPEC = scene.SceneSpec(
  field=field_lib.FieldSpec(grid=hashgrid.GridSpec(n_levels=4, log2_table_size=10), hidden=16),
  render=render.RenderSpec(n_samples=32, chunk=8),
  background="white",
)
REFS = (
  shapes.Reference("sphere", (0.8, 0.2, 0.2)),
  shapes.Reference("cube", (0.2, 0.3, 0.8)),
  shapes.Reference("sphere", (0.2, 0.7, 0.2)),
)
NAMES = ["sphere", "cube", "sphere#2"]
SIZE = 16
N_VIEWS = 2

render_camera = jax.jit(scene.render_camera, static_argnums=(3, 4, 5))


def _particle(seed: int) -> dict:
  return random_particle(SPEC, seed)


def _numpy_psnr(a, b):
  """PSNR (dB) of the mean over views of per-view MSEs; a, b [V, H, W, 3]."""
  per_view = []
  for v in range(a.shape[0]):
    per_view.append(np.sum((a[v].astype(np.float64) - b[v]) ** 2) / a[v].size)
  return -10.0 * np.log10(max(sum(per_view) / len(per_view), 1e-10))


def test_heldout_cameras():
  n = 6
  cams = evaluate.heldout_cameras(n)
  again = evaluate.heldout_cameras(n)
  for field in cams._fields:
    np.testing.assert_array_equal(getattr(cams, field), getattr(again, field))
  assert cams.c2w.shape == (n, 4, 4)
  elevation, azimuth = np.asarray(cams.elevation), np.asarray(cams.azimuth)
  assert np.all((elevation >= 0) & (elevation <= 30)) and np.ptp(elevation) > 0
  np.testing.assert_allclose(cams.radius, 1.5)
  np.testing.assert_allclose(cams.fovy, 45.0)
  assert np.all((azimuth >= -180) & (azimuth < 180))
  # Evenly spread: consecutive azimuths (sorted, wrapped) 60 degrees apart.
  gaps = np.diff(np.sort(azimuth), append=np.min(azimuth) + 360.0)
  np.testing.assert_allclose(gaps, 360.0 / n, atol=1e-3)
  # Never on the export orbit of n views (multiples of 360 / n).
  phase = np.mod(azimuth, 360.0 / n)
  assert np.all((phase > 0.2 * 360.0 / n) & (phase < 0.8 * 360.0 / n))
  # The cameras look at the origin from their spherical coordinates.
  expected = cameras.from_spherical(1.5, elevation, azimuth, 45.0).c2w
  np.testing.assert_allclose(cams.c2w, expected, atol=1e-6)
  other = evaluate.heldout_cameras(n, seed=1)
  assert not np.allclose(other.elevation, elevation)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="n"):
      evaluate.heldout_cameras(bad)


def test_unique_names():
  assert evaluate.unique_names(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]


def test_evaluate_2d_against_numpy():
  rng = np.random.default_rng(0)
  k, n, h, w = 3, 4, 5, 6
  means = rng.uniform(-1, 1, (k, 3, h, w))
  names = ["sphere", "cube", "sphere"]
  images = means[[1, 0, 2, 1]] + 0.1 * rng.normal(size=(n, 3, h, w))
  images[3] = means[1]  # An exact copy: PSNR at its 100 dB ceiling.
  images[0, 0, 0, 0] = 2.5  # Outside [-1, 1]: clipped to rgb 1.
  result = evaluate.evaluate_2d(images.astype(np.float32), means, names, 0.1)
  assert result["references"] == NAMES
  assert [p["nearest"] for p in result["particles"]] == ["cube", "sphere", "sphere#2", "cube"]
  assert result["covered"] == ["cube", "sphere", "sphere#2"]
  assert result["sigma_ref"] == 0.1
  for i, particle in enumerate(result["particles"]):
    for j, name in enumerate(NAMES):
      sq = 0.0
      for c in range(3):
        for y in range(h):
          for x in range(w):
            a = min(max((float(images[i, c, y, x]) + 1) / 2, 0.0), 1.0)
            b = min(max((means[j, c, y, x] + 1) / 2, 0.0), 1.0)
            sq += (a - b) ** 2
      expected = -10 * np.log10(max(sq / (3 * h * w), 1e-10))
      assert particle["psnr_to"][name] == pytest.approx(expected, abs=1e-3)
    assert particle["psnr"] == max(particle["psnr_to"].values())
  assert result["particles"][3]["psnr"] == pytest.approx(100.0)
  # Spread: per-pixel population std across particles, then the mean.
  stds = []
  for c in range(3):
    for y in range(h):
      for x in range(w):
        v = images[:, c, y, x].astype(np.float32).astype(np.float64)
        stds.append(np.sqrt(np.mean((v - np.mean(v)) ** 2)))
  assert result["spread"] == pytest.approx(np.mean(stds), rel=1e-5)


def test_evaluate_2d_spread_of_samples():
  # Samples of N(m, sigma^2) (what VSD targets) have spread ~ sigma; copies
  # of the mean (what SDS converges to) have none.
  rng = np.random.default_rng(1)
  sigma, n = 0.3, 64
  mean = rng.uniform(-0.5, 0.5, (1, 3, 8, 8))
  samples = mean + sigma * rng.normal(size=(n, 3, 8, 8))
  spread = evaluate.evaluate_2d(samples, mean, ["sphere"], sigma)["spread"]
  assert spread == pytest.approx(sigma * np.sqrt((n - 1) / n), rel=0.05)
  copies = np.repeat(mean, 4, axis=0)
  assert evaluate.evaluate_2d(copies, mean, ["sphere"], sigma)["spread"] < 1e-6


def test_evaluate_2d_bad_input():
  images, means = np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4))
  with pytest.raises(ValueError, match="images"):
    evaluate.evaluate_2d(images[0], means, ["a", "b"], 0.0)
  with pytest.raises(ValueError, match="means"):
    evaluate.evaluate_2d(images, means[:, :, :2], ["a", "b"], 0.0)
  with pytest.raises(ValueError, match="names"):
    evaluate.evaluate_2d(images, means, ["a"], 0.0)
  with pytest.raises(ValueError, match="sigma_ref"):
    evaluate.evaluate_2d(images, means, ["a", "b"], -1.0)
  with pytest.raises(ValueError, match="images"):
    evaluate.evaluate_2d(images * np.nan, means, ["a", "b"], 0.0)


@pytest.fixture(scope="module")
def particles():
  """Two particles: the initial blob, and an empty one (all background)."""
  stacked = jax.tree.map(lambda *v: np.stack(v), _particle(0), _particle(1))
  # Raw density -50 + O(1) + (blob bias <= 10) everywhere: transparent.
  last = f"layer_{SPEC.field.n_hidden_layers}"
  stacked["field"]["density_mlp"][last]["b"][1] = -50.0
  return stacked


@pytest.fixture(scope="module")
def result_3d(particles):
  return evaluate.evaluate_3d(particles, SPEC, REFS, n_views=N_VIEWS, size=SIZE, ray_batch=100)


def test_evaluate_3d_psnr_of_the_renders(particles, result_3d):
  assert result_3d["references"] == NAMES
  assert result_3d["n_views"] == N_VIEWS and result_3d["size"] == SIZE
  assert len(result_3d["particles"]) == 2
  cams = evaluate.heldout_cameras(N_VIEWS)
  refs = np.asarray(
    shapes.render_views(REFS, cams.c2w, cams.fovy, SIZE, SIZE)["rgb"]
  )  # [V, K, H, W, 3]
  # A white (all-background) reference set: only the shapes differ from it.
  assert np.all(refs[:, :, 0, 0] == 1.0) and np.any(refs < 0.9)
  for i, particle_result in enumerate(result_3d["particles"]):
    particle = jax.tree.map(lambda v: v[i], particles)
    rgb = np.stack(
      [
        np.asarray(render_camera(particle, cams.c2w[v], cams.fovy[v], SIZE, SIZE, SPEC)["rgb"])
        for v in range(N_VIEWS)
      ]
    )
    if i == 1:  # The empty particle shows the white background only.
      np.testing.assert_allclose(rgb, 1.0, atol=1e-6)
    expected = [_numpy_psnr(rgb, refs[:, k]) for k in range(len(REFS))]
    got = [particle_result["psnr_to"][name] for name in NAMES]
    np.testing.assert_allclose(got, expected, atol=1e-3)
    best = int(np.argmax(expected))
    assert particle_result["nearest"] == NAMES[best]
    assert particle_result["psnr"] == pytest.approx(expected[best], abs=1e-3)
  assert result_3d["covered"] == sorted({p["nearest"] for p in result_3d["particles"]})
  # The empty particle is nearest to the reference with the least coverage,
  # here the cube (smaller than the spheres, all equally far from white).
  assert result_3d["particles"][1]["nearest"] == "cube"


def test_evaluate_3d_bad_input(particles):
  one = jax.tree.map(lambda v: v[0], particles)
  with pytest.raises(ValueError, match="leading particle axis"):
    evaluate.evaluate_3d(one, SPEC, REFS)
  with pytest.raises(ValueError, match="refs"):
    evaluate.evaluate_3d(particles, SPEC, [])
  with pytest.raises(ValueError, match="unknown shape"):
    evaluate.evaluate_3d(particles, SPEC, "pyramid")
  with pytest.raises(ValueError, match="n_views"):
    evaluate.evaluate_3d(particles, SPEC, REFS, n_views=0)


def test_write_json_round_trip(result_3d, tmp_path):
  path = tmp_path / "final" / "eval.json"
  evaluate.write_json(result_3d, path)
  with open(path) as f:
    assert json.load(f) == result_3d
  evaluate.write_json({"x": np.float32(1.5), "y": np.arange(2)}, path)
  with open(path) as f:
    assert json.load(f) == {"x": 1.5, "y": [0, 1]}
  assert os.listdir(tmp_path / "final") == ["eval.json"]
  with pytest.raises(ValueError, match="JSON"):
    evaluate.write_json({"psnr": float("inf")}, path)
  with open(path) as f:  # The old file is left intact.
    assert json.load(f) == {"x": 1.5, "y": [0, 1]}
  assert os.listdir(tmp_path / "final") == ["eval.json"]
