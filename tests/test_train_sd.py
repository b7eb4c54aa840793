"""experiments/vsd.py's code path on a tiny Stable Diffusion built by the tests.

The tiny models (tests/tiny_sd.py) are saved as safetensors in diffusers'
layout and loaded by the same `models.build` a real run uses: VAE encoding of
the renders, view-dependent prompts with CFG, eps_phi = LoRA + camera MLP on a
v-prediction base, both optimiser steps in one compiled call.
"""
import jax
import numpy as np
import pytest

from experiments import sds, vsd
from vsdjax import models, train_step
from tiny_sd import tiny_sd, tiny_sd_v  # noqa: F401 (fixtures)


def _tiny(c, prior_dir):
  c.prior.name = prior_dir
  c.n_particles = 2
  c.scene.n_levels = 2
  c.scene.log2_table_size = 8
  c.scene.hidden = 8
  c.render.resolution = 64      # the tiny VAE downsamples by 8: 8x8 latents
  c.render.n_samples = 8
  c.render.chunk = 8
  return c


def test_vsd_step_on_tiny_stable_diffusion(tiny_sd, tiny_sd_v):
  c = _tiny(vsd.get_config(), tiny_sd.path)
  c.eps_phi.base = tiny_sd_v.path  # the paper: a v-prediction base for eps_phi
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  assert m.phi_prediction_type == "v_prediction"
  assert frozen["emb_cond"].shape[0] == 4  # front / side / back / overhead prompts
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


def test_sds_config_shares_the_step(tiny_sd):
  c = _tiny(sds.get_config(), tiny_sd.path)
  c.n_particles = 1
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  assert m.phi_unet is None and frozen["phi_base"] == {}
  state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
  state, metrics = train_step.make_train_step(c, m, frozen, 64)(state, jax.random.PRNGKey(2))
  assert np.isfinite(float(metrics["loss"])) and "phi_loss" not in metrics


def test_missing_model_fails_at_start_naming_it(tmp_path):
  c = vsd.get_config()
  c.prior.name = str(tmp_path / "no-such-model")
  with pytest.raises((ValueError, FileNotFoundError), match="no-such-model"):
    models.build(c, jax.random.PRNGKey(0))
