"""Previews and TensorBoard events of a run (training/previews.py, training/summaries.py).

The previews are checked against renders of single particles from single
cameras through Representation.render; the event files are read back with
TensorBoard's own reader and compared with metrics.jsonl, the preview PNGs
and config.json.
"""

import json
import os

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import trimesh

from helpers import random_particle, tiny_config
from vsdjax import cameras, checks, grid
from vsdjax.prior.analytic import shapes
from vsdjax.representations.mesh import dmtet, marching_tets, tetgrid, textured
from vsdjax.representations.nerf import NeRF, export, scene
from vsdjax.training import models, previews, summaries, workdir as workdir_lib


def _tile(picture, r, c, size):
  """Tile (r, c) [size, size, 3] of a grid.tile picture."""
  s = size + grid.PAD
  return picture[r * s : r * s + size, c * s : c * s + size]


def _check_against_direct_renders(rep, particles, data, size, channels):
  """Every tile of the preview of `particles` against a render of one particle from one camera."""
  render = previews.make_render(rep, size)
  picture = previews.to_grid(jax.device_get(render(particles, data)))
  cams = rep.preview_cameras(previews.VIEWS)
  n, views = jax.tree.leaves(particles)[0].shape[0], cams.c2w.shape[0]
  s = size + grid.PAD
  assert picture.shape == (n * s - grid.PAD, len(channels) * views * s - grid.PAD, 3)
  one = jax.jit(lambda p, d, c: rep.render(p, d, c, size, None))
  for i in range(n):
    params, own, aux = (
      jax.tree.map(lambda x: x[i], t) for t in (particles, data["particle"], data["aux"])
    )
    for v in range(views):
      cam = jax.tree.map(lambda x: x[v], cams)
      out = one(params, {"shared": data["shared"], "particle": own, "aux": aux}, cam)
      for k, name in enumerate(channels):
        expected = {"opacity": lambda x: x[..., None], "normal": lambda x: 0.5 * (x + 1.0)}.get(
          name, lambda x: x
        )(np.asarray(out[name]))
        tile = _tile(picture, i, k * views + v, size)
        np.testing.assert_allclose(tile, np.broadcast_to(expected, tile.shape), atol=1e-5)
  return picture


def test_previews_are_written_at_their_steps_and_are_the_particles_renders(tiny_run):
  workdir, config, state = tiny_run
  names = sorted(os.listdir(os.path.join(workdir, "previews")))
  assert names == ["000002.png", "000004.png"]
  m, frozen = models.build(config, jax.random.PRNGKey(0))
  preview = previews.make(config, m, frozen)
  picture = preview(state)  # The final state is step 4's.
  png = iio.imread(os.path.join(workdir, "previews", "000004.png"))
  assert np.abs(export.to_uint8(picture).astype(int) - png).max() <= 1
  preview(state)
  assert preview.render._cache_size() == 1
  # Image particles: a row each, one column (their one camera), rgb only.
  data = dict(frozen["representation"], aux={})
  size = config.render.resolution
  _check_against_direct_renders(m.representation, state["particles"], data, size, ("rgb",))
  x0 = np.asarray(state["particles"]["image"][1])  # [3, h, w]
  np.testing.assert_allclose(
    _tile(picture, 1, 0, size), 0.5 * (x0.transpose(1, 2, 0) + 1), atol=1e-6
  )


def test_previews_of_every_3d_representation_are_its_renders():
  # The NeRF's against direct renders (rows: particles; columns: rgb, normal, opacity x views).
  spec = scene.spec_from_config(tiny_config(**{"scene.shading": "diffuse"}))
  rep = NeRF(spec=spec, camera_ranges=cameras.CameraRanges())
  particles = jax.tree.map(lambda *x: np.stack(x), *(random_particle(spec, s) for s in (0, 1)))
  data = {"shared": {}, "particle": {}, "aux": {}}
  picture = _check_against_direct_renders(rep, particles, data, 8, ("rgb", "normal", "opacity"))
  assert np.ptp(picture) > 0.1  # Not a blank image.


def _channels(rep, particles, size=8) -> dict:
  """{channel: [n, V, size, size, 3]} of a preview, after the layout check."""
  images = jax.device_get(previews.make_render(rep, size)(particles, dict(rep.data(), aux={})))
  n, views = len(jax.tree.leaves(particles)[0]), previews.VIEWS
  s = size + grid.PAD
  assert previews.to_grid(images).shape == (n * s - grid.PAD, 2 * views * s - grid.PAD, 3)
  assert sorted(images) == ["opacity", "rgb"]
  return images


@pytest.mark.slow
def test_previews_of_meshes():
  # Layout and content only: a direct render to compare with would compile each again (~10 s).
  # DMTet spheres: the normal map on black, opacity covering the centre.
  grid_ = tetgrid.kuhn_grid(8, 1.0)
  sdf = np.asarray(shapes.sdf("sphere", jnp.asarray(grid_.verts)))
  rep = dmtet.DMTet(
    grid=grid_,
    max_faces=marching_tets.default_max_faces(grid_),
    camera_ranges=cameras.CameraRanges(),
    sdf0=np.stack([sdf, sdf + 0.1]),
  )
  zeros = np.zeros(rep.sdf0.shape + (3,), np.float32)
  images = _channels(rep, {"sdf": rep.sdf0, "deformation": zeros})
  opacity = images["opacity"][..., 0]  # [n, V, H, W]
  assert np.all(opacity[:, :, 4, 4] == 1.0) and np.all(opacity[:, :, 0, 0] == 0.0)
  assert np.all(images["rgb"][opacity == 0] == 0.0)
  # Textured icospheres: the texture on white.
  spec = scene.spec_from_config(tiny_config())
  ico = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
  verts, faces = np.asarray(ico.vertices, np.float32), np.asarray(ico.faces)
  rep = textured.TexturedMesh(
    spec=spec,
    camera_ranges=cameras.CameraRanges(),
    meshes=textured.pad_meshes([(verts, faces), (0.8 * verts, faces)]),
  )
  particles = jax.tree.map(lambda *x: np.stack(x), *(random_particle(spec, s) for s in (2, 3)))
  images = _channels(rep, particles)
  opacity = images["opacity"][..., 0]
  assert np.all(opacity[:, :, 4, 4] == 1.0)
  np.testing.assert_allclose(images["rgb"][opacity == 0], 1.0)


def _events(workdir):
  acc = event_accumulator.EventAccumulator(
    workdir,
    size_guidance={
      event_accumulator.SCALARS: 0,
      event_accumulator.IMAGES: 0,
      event_accumulator.TENSORS: 0,
    },
  )
  return acc.Reload()


def test_tensorboard_has_the_metrics_the_previews_and_the_config(tiny_run):
  workdir = tiny_run[0]
  events = _events(workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  names = sorted(set(records[0]) - {"step"})
  assert sorted(events.Tags()["scalars"]) == names
  for name in names:
    logged = [(e.step, e.value) for e in events.Scalars(name)]
    assert logged == [(r["step"], np.float32(r[name])) for r in records]  # float32 in events
  shown = events.Images("previews")
  assert [e.step for e in shown] == [2, 4]
  for e in shown:
    png = iio.imread(previews.path(workdir, e.step))
    np.testing.assert_array_equal(iio.imread(e.encoded_image_string), png)
  (text,) = events.Tensors("config/text_summary")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(text.tensor_proto.string_val[0].decode()) == json.load(f)


def test_a_resumed_segment_replaces_the_events_after_its_start(tmp_path):
  config = tiny_config()
  with summaries.Writer(config, str(tmp_path)) as board:  # An interrupted segment: 1..4.
    for step in range(1, 5):
      board.scalars({"step": step, "loss": float(step)})
  with summaries.Writer(config, str(tmp_path), start=2) as board:  # Resumed from 2.
    for step in (3, 4):
      board.scalars({"step": step, "loss": 10.0 * step})
  assert [(e.step, e.value) for e in _events(str(tmp_path)).Scalars("loss")] == [
    (1, 1.0),
    (2, 2.0),
    (3, 30.0),
    (4, 40.0),
  ]


def test_preview_every_is_checked_and_may_change_on_resume(tmp_path):
  with pytest.raises(checks.ConfigError, match="preview_every"):
    checks.validate_config(tiny_config(preview_every=-1))
  config = tiny_config(steps=7, preview_every=3)
  assert [s for s in range(1, 8) if previews.due(config, s)] == [3, 6]
  assert not any(previews.due(tiny_config(preview_every=0), s) for s in range(1, 8))
  # A run recorded before these fields existed resumes without --allow_change.
  saved = json.loads(config.to_json_best_effort())
  del saved["preview_every"], saved["eps_phi"]["batch_with_prior"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  assert workdir_lib.check_resume(config, str(tmp_path))


def _claims_module():
  """benchmarks/claims.py as a module (it imports spread_model from its folder)."""
  import importlib.util
  import sys

  folder = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
  sys.path.insert(0, folder)
  try:
    spec = importlib.util.spec_from_file_location("claims", os.path.join(folder, "claims.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(folder)
  return module


def test_claims_driver_matches_the_trainer_and_its_probe_renders(tiny_run):
  # benchmarks/claims.py trains in-process: the same particles as train_and_evaluate.
  claims = _claims_module()
  _, config, state = tiny_run
  cams = jax.tree.map(lambda v: jnp.asarray(v)[None], cameras.from_spherical(1.3, 15.0, 30.0, 50.0))
  probe, ref = claims.render_probe(shapes.parse_references("sphere,cube"), cams, 16)
  assert ref.shape == (1, 2, 16, 16, 3)
  _, _, own, trace, _ = claims.train(config, probe, 2)
  np.testing.assert_array_equal(own["particles"]["image"], state["particles"]["image"])
  assert [step for step, _ in trace] == [0, 2, 4]
  want = np.clip(0.5 * (np.moveaxis(np.asarray(own["particles"]["image"]), 1, -1) + 1.0), 0, 1)
  np.testing.assert_allclose(trace[-1][1][:, 0], want, atol=1e-6)


def test_claims_image_metrics_on_known_images():
  claims = _claims_module()
  rng = np.random.default_rng(0)
  ref = np.ones((2, 2, 8, 8, 3))  # [V, K, H, W, 3] on white
  ref[:, 0, 2:6, 2:6] = (0.8, 0.2, 0.2)  # reference 0: a red square
  ref[:, 1, 2:6, 2:6] = (0.2, 0.2, 0.8)  # reference 1: a blue square
  rgb = np.stack([ref[:, 0], ref[:, 1], ref[:, 0]])  # [3, V, H, W, 3]: red, blue, noisy red
  rgb[2, :, 2:6, 2:6] += 0.05 * rng.standard_normal((2, 4, 4, 3))
  rgb[2, :, 2:6, 2:6, 0] = 1.0  # saturated: red channel clipped, detail in g and b only
  out = claims.image_metrics(rgb, ref, 0)
  assert out["nearest"] == [0, 1, 0]
  assert out["psnr_to"][0][0] == 100.0 and out["psnr_to"][1][1] == 100.0
  assert out["saturation"][0] == pytest.approx(0.75)
  assert out["saturation_ref"] == pytest.approx(0.75)
  assert out["saturation"][2] > 0.75
  assert out["colour"][1] == pytest.approx([0.2, 0.2, 0.8])
  # Detail: 2 x the residual's std in x0 units, over the object's pixels, mean over channels.
  assert out["detail"][0] == 0.0
  assert out["detail"][2] == pytest.approx(2 * 0.05 * 2 / 3, rel=0.25)
