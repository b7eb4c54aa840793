"""experiments/vsd.py's code path on a tiny Stable Diffusion built by the tests.

The tiny models (tests/tiny_sd.py) are saved as safetensors in diffusers'
layout and loaded by the same `models.build` a real run uses: VAE encoding of
the renders, view-dependent prompts with CFG, eps_phi = LoRA + camera MLP on a
v-prediction base, both optimiser steps in one compiled call.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sds, vsd, vsd_geometry, vsd_texture
from tiny_sd import tiny_sd, tiny_sd_v  # noqa: F401 (fixtures)
from vsdjax import checks, train
from vsdjax.prior import stable_diffusion as sd_lib
from vsdjax.training import models, stages, train_step


def _tiny(c, prior_dir):
  c.prior.name = prior_dir
  c.n_particles = 2
  c.scene.n_levels = 2
  c.scene.log2_table_size = 8
  c.scene.hidden = 8
  c.render.resolution = 64  # the tiny VAE downsamples by 8: 8x8 latents
  c.render.n_samples = 8
  c.render.chunk = 8
  return c


@pytest.mark.slow
@pytest.mark.torch
def test_vsd_step_on_tiny_stable_diffusion(tiny_sd, tiny_sd_v):
  c = _tiny(vsd.get_config(), tiny_sd.path)
  c.eps_phi.base = tiny_sd_v.path  # the paper: a v-prediction base for eps_phi
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  assert m.eps_phi.prediction_type == "v_prediction"
  assert frozen["prior"]["emb_cond"].shape[0] == 4  # front / side / back / overhead prompts
  state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
  phi0 = jax.tree.map(np.asarray, state["phi"])
  grid0 = np.asarray(state["particles"]["field"]["grid"]["tables"])
  step = train_step.make_train_step(c, m, frozen, c.render.resolution)
  for _ in range(2):
    state, metrics = step(state, jax.random.PRNGKey(2))
  assert step.jitted._cache_size() == 1  # one compilation for both optimiser steps
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["guidance_grad_norm"]) > 0
  # Both optimisers stepped: every particle's grid and the LoRA factors moved.
  grid = np.asarray(state["particles"]["field"]["grid"]["tables"])
  assert all(np.abs(grid[i] - grid0[i]).max() > 0 for i in range(2))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["phi"], phi0)
  assert max(jax.tree.leaves(moved["lora"])) > 0 and max(jax.tree.leaves(moved["camera"])) > 0


@pytest.mark.slow
@pytest.mark.torch
def test_one_unet_call_for_the_prior_and_eps_phi_matches_two(tiny_sd):
  """eps_phi = LoRA on the prior's UNet: the CFG pair and eps_phi's target as one
  batch-3 call (rows without LoRA and camera are the prior's) give the step of
  two calls, with LoRA and camera MLP away from zero so that both rows differ."""
  c = _tiny(vsd.get_config(), tiny_sd.path)
  c.n_particles, c.eps_phi.base = 1, "prior"
  results = {}
  for joint in (True, False):
    c.eps_phi.batch_with_prior = joint
    m, frozen = models.build(c, jax.random.PRNGKey(0))
    assert m.batch_with_prior == joint
    state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
    rng = np.random.default_rng(3)
    state["phi"] = jax.tree.map(
      lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), state["phi"]
    )
    step = train_step.make_train_step(c, m, frozen, c.render.resolution)
    state, metrics = step(state, jax.random.PRNGKey(2))
    results[joint] = jax.tree.map(np.asarray, (state["particles"], state["phi"], metrics))
  (p1, phi1, m1), (p2, phi2, m2) = results[True], results[False]
  for name in ("loss", "guidance_grad_norm", "particle_grad_norm", "phi_loss"):
    np.testing.assert_allclose(m1[name], m2[name], rtol=1e-4, err_msg=name)
  for (path, a), (_, b) in zip(*(jax.tree_util.tree_leaves_with_path(x) for x in (p1, p2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
  for a, b in zip(jax.tree.leaves(phi1), jax.tree.leaves(phi2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.torch
def test_sds_config_shares_the_step(tiny_sd):
  c = _tiny(sds.get_config(), tiny_sd.path)
  c.n_particles = 1
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  assert m.eps_phi is None and frozen["phi_base"] == {}
  state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
  state, metrics = train_step.make_train_step(c, m, frozen, 64)(state, jax.random.PRNGKey(2))
  assert np.isfinite(float(metrics["loss"])) and "phi_loss" not in metrics


def test_missing_model_fails_at_start_naming_it(tmp_path):
  c = vsd.get_config()
  c.prior.name = str(tmp_path / "no-such-model")
  with pytest.raises(checks.ModelLoadError, match="config field prior.name=.*no-such-model"):
    models.build(c, jax.random.PRNGKey(0))


def _traced_inputs(step, state, frozen):
  """{module class name: [input shapes]} of every UNet and VAE-encoder call in one step."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    name = type(context.module).__name__
    if context.method_name == "__call__" and name in ("FlaxUNet2DConditionModel", "FlaxEncoder"):
      seen.setdefault(name, []).append(tuple(args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(step.jitted, state, jax.random.PRNGKey(0), frozen)
  return seen


@pytest.mark.torch
def test_renders_are_resized_to_the_priors_own_size(tiny_sd, tiny_sd_v):
  # The tiny UNet's sample_size is 16 (x 8 = 128 images); the render is 64.
  c = _tiny(vsd.get_config(), tiny_sd.path)
  c.eps_phi.base = tiny_sd_v.path
  c.n_particles = 3
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  state = jax.eval_shape(lambda: train_step.init_state(c, m, frozen, jax.random.PRNGKey(1)))
  seen = _traced_inputs(train_step.make_train_step(c, m, frozen, 64), state, frozen)
  assert seen["FlaxEncoder"] == [(1, 128, 128, 3)]
  # Prior CFG pair (2), eps_phi's target (1), eps_phi's loss on the 3 particles' latents.
  assert sorted(seen["FlaxUNet2DConditionModel"]) == [
    (1, 4, 16, 16),
    (2, 4, 16, 16),
    (3, 4, 16, 16),
  ]


@pytest.mark.parametrize(
  "phi_base,dtype", [("stable-diffusion-2-1", "float32"), ("prior", "bfloat16")]
)
@pytest.mark.slow
def test_real_sd_step_shapes_at_a_64_render(phi_base, dtype):
  """SD 2.1-base (and SD 2.1 for eps_phi) at their real sizes, no weights: a 64x64
  render reaches the VAE as 512x512 and both UNets as 64x64 latents; eps_phi's
  trainable state stays float32 over a bfloat16 prior."""
  c = vsd.get_config()
  c.eps_phi.base, c.prior.dtype = phi_base, dtype
  m, frozen = models.build_abstract(c)
  state = jax.eval_shape(lambda f: train_step.init_state(c, m, f, jax.random.PRNGKey(1)), frozen)
  assert {
    leaf.dtype
    for leaf in jax.tree.leaves((state["phi"], state["phi_opt"]))
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  } == {jnp.dtype(jnp.float32)}
  seen = _traced_inputs(train_step.make_train_step(c, m, frozen, 64), state, frozen)
  assert seen["FlaxEncoder"] == [(1, 512, 512, 3)]
  # The prior's CFG pair, eps_phi's target (one batch-3 call where eps_phi shares the
  # prior's UNet) and eps_phi's update.
  assert sorted(seen["FlaxUNet2DConditionModel"]) == (
    [(1, 4, 64, 64), (3, 4, 64, 64)]
    if phi_base == "prior"
    else [(1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64)]
  )


def test_the_sd_prior_encodes_a_posterior_sample_of_the_resized_render(tiny_sd):
  c = _tiny(sds.get_config(), tiny_sd.path)
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  rgb = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3))
  key = jax.random.PRNGKey(2)
  x0 = m.prior.encode(frozen["prior"], rgb, key)
  sd = frozen["prior"]["sd"]
  resized = sd_lib.resize_images(rgb, 128)
  np.testing.assert_allclose(x0, sd_lib.encode_images(sd, resized, key), rtol=1e-6)
  assert np.abs(np.asarray(x0 - sd_lib.encode_images(sd, resized))).max() > 0  # not the mean


def _tiny_mesh(c, prior_dir):
  c.prior.name = prior_dir
  c.mesh.grid_resolution = 8
  c.render.resolution = c.render.resolution_after = 64
  c.export.views, c.export.video_frames, c.export.resolution = 1, 1, 16
  c.export.texture_size = 32
  return c


def _moved(a, b) -> float:
  return max(
    jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - y).max()), a, b))
  )


@pytest.mark.slow
@pytest.mark.torch
def test_geometry_and_texture_stages_on_tiny_stable_diffusion(tiny_sd, tiny_sd_v, tmp_path):
  # Stage 2: SDS on normal maps from a sphere (no stage-1 run needed), through the trainer.
  c2 = _tiny_mesh(vsd_geometry.get_config(), tiny_sd.path)
  c2.init_from, c2.steps, c2.n_particles = "", 2, 2
  geometry = str(tmp_path / "geometry")
  state = train.train_and_evaluate(c2, geometry)
  sdf0 = np.asarray(models.build(c2, jax.random.PRNGKey(0))[0].representation.sdf0)
  assert all(np.abs(np.asarray(state["particles"]["sdf"][i]) - sdf0[i]).max() > 0 for i in (0, 1))
  with open(os.path.join(geometry, "metrics.jsonl")) as f:
    metrics = json.loads(f.read().splitlines()[-1])
  assert all(np.isfinite(v) for v in metrics.values())
  assert metrics["mesh_faces"] > 0 and metrics["loss_normal_consistency"] > 0
  assert os.path.getsize(os.path.join(geometry, "final", "particle_1", "mesh.obj")) > 0

  # Stage 3 from that work directory: VSD with LoRA eps_phi, both steps in one compiled call.
  c3 = _tiny_mesh(_tiny(vsd_texture.get_config(), tiny_sd.path), tiny_sd.path)
  c3.init_from, c3.eps_phi.base = geometry, tiny_sd_v.path
  stages.inherit(c3)
  assert c3.n_particles == 2
  checks.validate_config(c3)
  m, frozen = models.build(c3, jax.random.PRNGKey(0))
  assert frozen["representation"]["particle"]["faces"].shape[0] == 2
  state = train_step.init_state(c3, m, frozen, jax.random.PRNGKey(1))
  field0, phi0 = jax.tree.map(np.asarray, (state["particles"]["field"], state["phi"]))
  step = train_step.make_train_step(c3, m, frozen, 64)
  for _ in range(2):
    state, metrics = step(state, jax.random.PRNGKey(2))
  assert step.jitted._cache_size() == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert _moved(state["particles"]["field"], field0) > 0
  assert _moved(state["phi"]["lora"], phi0["lora"]) > 0


@pytest.mark.slow
def test_real_sd_geometry_step_shapes_at_512():
  """The geometry stage at SD 2.1-base's real sizes, no weights: 512x512 normal maps reach the
  VAE at 512 and the prior's CFG pair at 64x64 latents (no eps_phi: SDS)."""
  c = vsd_geometry.get_config()
  c.init_from = ""  # the analytic start shape
  m, frozen = models.build_abstract(c)
  state = jax.eval_shape(lambda f: train_step.init_state(c, m, f, jax.random.PRNGKey(1)), frozen)
  assert state["particles"]["sdf"].shape == (1, 65**3)
  seen = _traced_inputs(train_step.make_train_step(c, m, frozen, 512), state, frozen)
  assert seen["FlaxEncoder"] == [(1, 512, 512, 3)]
  assert seen["FlaxUNet2DConditionModel"] == [(2, 4, 64, 64)]
