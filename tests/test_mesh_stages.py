"""Stages 2 and 3: the DMTet and textured-mesh representations, their exports and the chain.

References are independent of the rasterizer: normal maps of the analytic
shapes come from sphere tracing their SDFs (shapes.py); the baked texture is
checked against the colour function it was baked from, looked up at the
xatlas UVs by numpy.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trimesh

from helpers import tiny_config
from vsdjax import cameras, checks, train
from vsdjax.prior.analytic import shapes
from vsdjax.representations.mesh import dmtet, export, marching_tets, tetgrid, textured
from vsdjax.representations.nerf import scene
from vsdjax.training import models, stages, train_step, workdir as workdir_lib


def _sphere_dmtet(resolution=32):
  grid = tetgrid.kuhn_grid(resolution, 1.0)
  sdf = np.asarray(shapes.sdf("sphere", jnp.asarray(grid.verts)))
  return dmtet.DMTet(
    grid=grid,
    max_faces=marching_tets.default_max_faces(grid),
    camera_ranges=cameras.CameraRanges(),
    sdf0=sdf[None],
  )


def test_dmtet_normal_map_matches_the_sphere_traced_one():
  rep = _sphere_dmtet()
  data = rep.data()
  params = rep.init(None, {"shared": data["shared"], "particle": {"sdf0": rep.sdf0[0]}})
  cam = cameras.from_spherical(1.4, 20.0, 35.0, 50.0)
  out = jax.jit(lambda p: rep.render(p, {"shared": data["shared"]}, cam, 64, None))(params)
  ref = shapes.render_views(shapes.parse_references("sphere"), cam.c2w, cam.fovy, 64, 64)
  ref_rgb, ref_mask = np.asarray(ref["normal_rgb"][0]), np.asarray(ref["mask"][0])
  mask = np.asarray(out["opacity"]) > 0.5
  assert np.mean(mask != (ref_mask > 0.5)) < 0.01  # the outline, to a pixel
  inner = mask & (ref_mask > 0.5)
  for shift, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1)):  # off the antialiased outline
    inner &= np.roll(inner, shift, axis)
  # Normals of the grid-32 marching-tets sphere against the exact ones.
  assert np.mean(np.abs(np.asarray(out["rgb"])[inner] - ref_rgb[inner])) < 0.02
  background = ~mask & (ref_mask == 0)
  for shift, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
    background &= np.roll(background, shift, axis)
  assert np.all(np.asarray(out["rgb"])[background] == 0)  # black background
  assert float(out["metrics"]["mesh_face_overflow"]) == 0


def test_dmtet_gradients_reach_sdf_and_deformation_and_regularisers_are_small_on_a_sphere():
  rep = dataclasses.replace(_sphere_dmtet(16), normal_consistency=1.0, laplacian=1.0)
  data = rep.data()
  params = rep.init(None, {"shared": data["shared"], "particle": {"sdf0": rep.sdf0[0]}})
  cam = cameras.from_spherical(1.4, 10.0, 0.0, 50.0)

  def loss(p):
    out = rep.render(p, {"shared": data["shared"]}, cam, 32, None)
    return jnp.mean(out["rgb"][..., 0]), rep.regularisers(out, 0)

  (_, reg), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert float(jnp.abs(grads["sdf"]).sum()) > 0
  assert float(jnp.abs(grads["deformation"]).sum()) > 0
  assert 0 < float(reg["normal_consistency"]) < 0.05
  assert 0 < float(reg["laplacian"]) < 0.3  # a sum over about 6 neighbours of under 0.05 each


def test_baked_texture_reproduces_the_colour_function():
  mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
  verts, faces = np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces)
  colour = lambda x: jnp.clip(x + 0.5, 0.0, 1.0)  # smooth in space
  vmapping, atlas_faces, uv = export.uv_atlas(verts, faces)
  size = 256
  tex = export.bake(colour, verts, vmapping, atlas_faces, uv, size)
  # Face centroids looked up in the image (nearest texel; row 0 is v = 1).
  tri_uv = uv[atlas_faces].mean(axis=1)  # [f, 2]
  tri_x = verts[vmapping][atlas_faces].mean(axis=1)  # [f, 3]
  rows = np.clip(((1.0 - tri_uv[:, 1]) * size).astype(int), 0, size - 1)
  cols = np.clip((tri_uv[:, 0] * size).astype(int), 0, size - 1)
  err = np.abs(tex[rows, cols] - np.clip(tri_x + 0.5, 0, 1))
  assert np.median(err) < 0.01 and np.percentile(err, 95) < 0.03


def test_dilate_fills_around_the_charts_only_from_filled_texels():
  image = np.zeros((8, 8, 3), np.float32)
  filled = np.zeros((8, 8), bool)
  image[3:5, 3:5], filled[3:5, 3:5] = 0.7, True
  out = export.dilate(image, filled, rings=2)
  # Texels within 2 steps (4-neighbour) of the chart take its colour, the others stay empty.
  i, j = np.mgrid[:8, :8]
  steps = np.maximum(np.maximum(3 - i, i - 4), 0) + np.maximum(np.maximum(3 - j, j - 4), 0)
  np.testing.assert_allclose(out[steps <= 2], 0.7, rtol=1e-6)
  assert np.all(out[steps > 2] == 0)


def _stage1_config(workdir_steps=6):
  c = tiny_config(**{"eps_phi.tiny_channels": (64, 64)})
  c.prior.references = "sphere:#d04040"
  c.n_particles = 2
  c.steps = workdir_steps
  c.render.resolution = c.render.resolution_after = 16
  c.prior.reference_size = 16
  c.export.views = 1
  c.export.video_frames = 2
  c.export.resolution = 16
  c.export.mesh_resolution = 16
  c.export.eval_views = 2
  return c


def test_a_nerf_without_a_surface_at_mesh_iso_is_refused():
  c = _stage1_config()
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  particles = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))["particles"]
  points = tetgrid.kuhn_grid(8, 1.0).verts
  sdf = dmtet.nerf_sdf((c, particles), points, iso=10.0)  # the blob: exp(10) at the centre
  assert sdf.shape == (2, len(points)) and (sdf < 0).any() and (sdf > 0).any()
  with pytest.raises(checks.ConfigError, match="mesh.iso=1e\\+30.*particle 0"):
    dmtet.nerf_sdf((c, particles), points, iso=1e30)


def _bbox_of_meshes(meshes):
  lo = np.min([v.min(axis=0) for v, _ in meshes], axis=0)
  hi = np.max([v.max(axis=0) for v, _ in meshes], axis=0)
  return lo.astype(np.float64), hi.astype(np.float64)


def test_fitted_box_is_the_union_of_the_meshes_boxes_widened_and_clipped():
  grid = tetgrid.kuhn_grid(16, 1.0)
  x = grid.verts.astype(np.float64)
  sdf = np.stack(
    [
      np.linalg.norm(x - [0.75, 0.0, 0.1], axis=-1) - 0.3,  # reaches past x = 1 (clipped)
      np.linalg.norm(x - [-0.2, 0.1, 0.0], axis=-1) - 0.4,
    ]
  ).astype(np.float32)
  max_faces = marching_tets.default_max_faces(grid)
  meshes = [
    marching_tets.used_mesh(marching_tets.marching_tets(grid, s, grid.verts, max_faces))
    for s in sdf
  ]
  lo, hi = _bbox_of_meshes(meshes)
  got_lo, got_hi = dmtet.fitted_box(grid, sdf, 0.1, 1.0)
  np.testing.assert_allclose(got_lo, lo - 0.1 * (hi - lo), atol=1e-5)
  np.testing.assert_allclose(got_hi, np.minimum(hi + 0.1 * (hi - lo), 1.0), atol=1e-5)
  assert got_hi[0] == 1.0 and got_lo[0] > -1.0


def _nerf_and_geometry_configs():
  """(stage-1 run (config, fresh NeRF particles), a stage-2 config on a 16-cell grid)."""
  from experiments import toy_geometry

  c1 = _stage1_config()
  m, frozen = models.build(c1, jax.random.PRNGKey(0))
  particles = train_step.init_state(c1, m, frozen, jax.random.PRNGKey(1))["particles"]
  c2 = toy_geometry.get_config()
  c2.mesh.grid_resolution, c2.mesh.iso = 16, 1.0
  return (c1, jax.tree.map(np.asarray, particles)), c2


def test_the_geometry_stage_fits_its_grid_to_the_nerf_surface_and_stage_3_rebuilds_it():
  stage1, c2 = _nerf_and_geometry_configs()
  previous = [stage1]
  start = lambda s: {"sdf": s, "deformation": np.zeros(s.shape + (3,), np.float32)}
  meshes = lambda rep: [rep.host_mesh(start(s), rep.data()["shared"]) for s in rep.sdf0]

  c2.mesh.fit_box = False
  whole = dmtet.DMTet.from_config(c2, previous)
  assert whole.grid.box == ((-1.0,) * 3, (1.0,) * 3)
  lo, hi = _bbox_of_meshes(meshes(whole))
  c2.mesh.fit_box = True
  fitted = dmtet.DMTet.from_config(c2, previous)
  pad = 0.1 * (hi - lo)
  np.testing.assert_allclose(fitted.grid.box, [lo - pad, hi + pad], atol=1e-5)
  assert np.all(fitted.grid.cell_size < 0.7 * whole.grid.cell_size)
  # The same surface, drawn with finer cells.
  np.testing.assert_allclose(
    _bbox_of_meshes(meshes(fitted)), (lo, hi), atol=0.5 * whole.grid.cell_size[0]
  )
  # Stage 3 rebuilds the fitted grid from the runs stage 2 started from.
  geometry = {"sdf": fitted.sdf0 + 0.01, "deformation": np.zeros(fitted.sdf0.shape + (3,))}
  for (v, f), s in zip(dmtet.meshes_of(c2, geometry, previous), geometry["sdf"]):
    v_ref, f_ref = fitted.host_mesh(start(s), fitted.data()["shared"])
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(f, f_ref)
  # A run recorded before mesh.fit_box existed, read as stages.load_run reads it: the whole cube.
  recorded = json.loads(c2.to_json_best_effort())
  del recorded["mesh"]["fit_box"]
  old = ml_collections.ConfigDict(workdir_lib.with_added_fields(recorded))
  assert dmtet.DMTet.from_config(old, previous).grid.box == whole.grid.box


def test_the_texture_starts_from_the_stage_1_field_or_afresh():
  from experiments import toy_texture

  stage1, c2 = _nerf_and_geometry_configs()
  sdf = dmtet.DMTet.from_config(c2, [stage1]).sdf0
  geometry = {"sdf": sdf, "deformation": np.zeros(sdf.shape + (3,), np.float32)}
  c3 = toy_texture.get_config()
  inherited = textured.TexturedMesh.from_config(c3, [(c2, geometry), stage1])
  assert inherited.start is stage1[1]
  assert inherited.spec.field == scene.spec_from_config(stage1[0]).field
  c3.mesh.texture_from_nerf = False
  fresh = textured.TexturedMesh.from_config(c3, [(c2, geometry), stage1])
  assert fresh.start is None and "start" not in fresh.data()["particle"]
  assert fresh.spec.field == scene.spec_from_config(c3).field != inherited.spec.field
  np.testing.assert_array_equal(fresh.meshes["faces"], inherited.meshes["faces"])


@pytest.mark.slow
def test_the_toy_chain_nerf_geometry_texture(tmp_path):
  from experiments import toy_geometry, toy_texture

  c1 = _stage1_config()
  c2 = toy_geometry.get_config()
  c2.steps, c2.n_particles = 4, 1  # n_particles comes from stage 1
  c2.mesh.grid_resolution = 16
  c2.render.resolution = c2.render.resolution_after = c2.prior.reference_size = 32
  c2.export.views, c2.export.video_frames, c2.export.resolution = 1, 2, 32
  c2.export.eval_views = 2
  c3 = toy_texture.get_config()
  c3.steps = 4
  c3.prior.references = "cube"  # replaced by stage 1's references
  c3.render.resolution = c3.render.resolution_after = 16
  c3.eps_phi.tiny_channels = (64, 64)
  c3.export.views, c3.export.video_frames, c3.export.resolution = 1, 2, 16
  c3.export.eval_views, c3.export.texture_size = 2, 64
  train.train_chain([c1, c2, c3], str(tmp_path))
  s1, s2, s3 = (str(tmp_path / f"stage{k}") for k in (1, 2, 3))
  assert c2.init_from == s1 and c3.init_from == s2
  assert c2.n_particles == c3.n_particles == 2 and c3.prior.references == "sphere:#d04040"

  with open(os.path.join(s2, "final", "eval.json")) as f:
    geo = json.load(f)
  for key in ("chamfer", "init_chamfer", "normal_psnr"):
    assert np.asarray(geo[key]).shape == (2, 1)
  assert geo["nearest"] == ["sphere", "sphere"]
  for name in ("mesh.obj", "mesh.glb", "normals.mp4", "normals_0.png"):
    assert os.path.getsize(os.path.join(s2, "final", "particle_1", name)) > 0
  with open(os.path.join(s2, "metrics.jsonl")) as f:
    last = json.loads(f.read().splitlines()[-1])
  assert last["mesh_faces"] > 100 and last["mesh_face_overflow"] == 0
  assert last["loss_normal_consistency"] > 0 and last["loss_laplacian"] > 0

  with open(os.path.join(s3, "final", "eval.json")) as f:
    tex = json.load(f)
  assert len(tex["particles"]) == 2 and all(np.isfinite(p["psnr"]) for p in tex["particles"])
  for name in ("mesh.obj", "mesh.mtl", "texture.png", "mesh.glb", "video.mp4", "view_0.png"):
    assert os.path.getsize(os.path.join(s3, "final", "particle_0", name)) > 0
  # The texture field starts as the stage-1 field.
  _, nerf = stages.load_run(s1)
  m, frozen = models.build(c3, jax.random.PRNGKey(0))
  start = train_step.init_state(c3, m, frozen, jax.random.PRNGKey(1))["particles"]
  for a, b in zip(jax.tree.leaves(nerf), jax.tree.leaves(start)):
    np.testing.assert_array_equal(a, b)

  # The same call again: every stage is done, nothing is retrained or rewritten.
  stamp = os.path.getmtime(os.path.join(s3, "final", "eval.json"))
  train.train_chain([_stage1_config(), c2, c3], str(tmp_path))
  assert os.path.getmtime(os.path.join(s3, "final", "eval.json")) == stamp


def test_solid_fills_cavities_and_drops_small_pieces():
  n = 9
  i, j, k = np.mgrid[:n, :n, :n]
  sdf = np.clip(np.sqrt((i - 4.0) ** 2 + (j - 4.0) ** 2 + (k - 4.0) ** 2) - 3.5, -1.0, 1.0)
  sdf[4, 4, 4] = 1.0  # a cavity at the centre, unreachable from outside
  sdf[0, 0, 0] = -1.0  # a one-vertex piece in a corner
  out = dmtet.solid(sdf.reshape(-1).astype(np.float32)).reshape(n, n, n)
  assert out[4, 4, 4] == -1.0 and out[0, 0, 0] == 1.0
  untouched = np.ones_like(sdf, bool)
  untouched[4, 4, 4] = untouched[0, 0, 0] = False
  np.testing.assert_array_equal(out[untouched], sdf[untouched].astype(np.float32))


def test_solid_closes_a_shell_with_a_hole_and_keeps_its_outer_surface():
  n = 15
  i, j, k = np.mgrid[:n, :n, :n]
  r = np.sqrt((i - 7.0) ** 2 + (j - 7.0) ** 2 + (k - 7.0) ** 2)
  sdf = np.clip(np.abs(r - 5.0) - 0.8, -1.0, 1.0)  # a hollow shell: inside only near r = 5
  sdf[7, 7, 10:] = 1.0  # a one-vertex-wide hole from the outside into the cavity
  flat = sdf.reshape(-1).astype(np.float32)
  assert dmtet.solid(flat).reshape(n, n, n)[7, 7, 7] == 1.0  # open: not a cavity
  out = dmtet.solid(flat, close=1).reshape(n, n, n)
  assert np.all(out[r < 4.0] == -1.0)  # the cavity is filled
  assert out[7, 7, 12] == -1.0  # and the hole in the shell (r = 5) closed
  outer = r > 6.0
  np.testing.assert_array_equal(out[outer], flat.reshape(n, n, n)[outer])  # outside untouched


def test_a_face_budget_too_small_is_a_metric_in_training_and_an_error_on_export():
  rep = dataclasses.replace(_sphere_dmtet(16), max_faces=100)
  data = rep.data()
  params = rep.init(None, {"shared": data["shared"], "particle": {"sdf0": rep.sdf0[0]}})
  cam = cameras.from_spherical(1.4, 10.0, 0.0, 50.0)
  out = jax.jit(lambda p: rep.render(p, {"shared": data["shared"]}, cam, 16, None))(params)
  assert int(out["metrics"]["mesh_face_overflow"]) == 1
  assert int(out["metrics"]["mesh_faces"]) > 100
  with pytest.raises(ValueError, match="max_faces"):
    rep.host_mesh(params, data["shared"])
