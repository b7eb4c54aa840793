"""Tests of vsdjax.prior.schedule against diffusers' PyTorch DDPMScheduler."""

import json
import os

from diffusers import DDPMScheduler
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vsdjax.prior import schedule

SD_CONFIGS = "/work/shared/sd-configs"
CONFIGS = {
  "scaled_linear": schedule.SD_SCHEDULER,
  "linear": {
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
  },
  "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
}


def _ddpm(config):
  fields = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
  return DDPMScheduler(**{k: v for k, v in config.items() if k in fields})


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.torch
def test_alphas_cumprod_matches_diffusers(name):
  ours = schedule.alphas_cumprod(CONFIGS[name])
  ref = _ddpm(CONFIGS[name]).alphas_cumprod.numpy()
  assert ours.dtype == np.float32 and ours.shape == (1000,)
  # diffusers accumulates in float32, we in float64: agree to float32 error.
  np.testing.assert_allclose(ours, ref, rtol=3e-5, atol=1e-7)
  assert np.all(np.diff(ours) < 0) and 0 < ours[-1] and ours[0] < 1


def test_scaled_linear_formula_and_other_lengths():
  # scaled_linear: beta_i = linspace(sqrt(.00085), sqrt(.012), 1000)_i ** 2.
  betas = [(0.00085**0.5 + i * (0.012**0.5 - 0.00085**0.5) / 999) ** 2 for i in range(1000)]
  abar, ref = 1.0, []
  for b in betas:
    abar *= 1.0 - b
    ref.append(abar)
  np.testing.assert_allclose(schedule.alphas_cumprod(schedule.SD_SCHEDULER), ref, rtol=1e-6)
  config = dict(CONFIGS["linear"], num_train_timesteps=37)
  np.testing.assert_allclose(
    schedule.alphas_cumprod(config), _ddpm(config).alphas_cumprod.numpy(), rtol=1e-5
  )


@pytest.mark.parametrize("folder", ["stable-diffusion-2-1", "stable-diffusion-2-1-base"])
def test_real_sd_scheduler_configs(folder):
  with open(os.path.join(SD_CONFIGS, folder, "scheduler", "scheduler_config.json")) as f:
    config = json.load(f)
  for key, value in schedule.SD_SCHEDULER.items():
    assert config[key] == value
  np.testing.assert_array_equal(
    schedule.alphas_cumprod(config), schedule.alphas_cumprod(schedule.SD_SCHEDULER)
  )


def test_trained_betas_override():
  betas = np.linspace(0.01, 0.2, 10)
  np.testing.assert_allclose(
    schedule.alphas_cumprod({"trained_betas": list(betas), "num_train_timesteps": 10}),
    np.cumprod(1 - betas),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  "config, field",
  [
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"),
    ({"beta_start": -0.1}, "beta_start"),
    ({"beta_end": float("nan")}, "beta_end"),
    ({"beta_end": 1.5}, "beta_end"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10.0}, "num_train_timesteps"),
    ({"trained_betas": [[0.1]]}, "trained_betas"),
    ({"trained_betas": [0.1, 1.0]}, "trained_betas"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
  ],
)
def test_alphas_cumprod_rejects_bad_configs(config, field):
  with pytest.raises(ValueError, match=field):
    schedule.alphas_cumprod(config)


def test_alphas_cumprod_rejects_non_mapping():
  with pytest.raises(ValueError, match="scheduler_config must be a mapping"):
    schedule.alphas_cumprod([("beta_schedule", "linear")])


@pytest.mark.torch
def test_coefficients_add_noise_velocity_match_diffusers():
  ddpm = _ddpm(schedule.SD_SCHEDULER)
  table = schedule.alphas_cumprod(schedule.SD_SCHEDULER)
  rng = np.random.default_rng(0)
  t = np.array([0, 1, 250, 998, 999])
  x0 = rng.normal(size=(5, 4, 3, 2)).astype(np.float32)
  eps = rng.normal(size=(5, 4, 3, 2)).astype(np.float32)
  a_t, s_t = schedule.coefficients(table, jnp.asarray(t))
  assert a_t.shape == s_t.shape == (5,)
  np.testing.assert_allclose(np.square(a_t) + np.square(s_t), 1.0, atol=1e-6)
  x_t = schedule.add_noise(x0, eps, a_t, s_t)
  tx0, teps = torch.from_numpy(x0), torch.from_numpy(eps)
  tt = torch.from_numpy(t)
  np.testing.assert_allclose(x_t, ddpm.add_noise(tx0, teps, tt).numpy(), rtol=1e-5, atol=1e-6)
  v = schedule.v_target(x0, eps, a_t, s_t)
  np.testing.assert_allclose(v, ddpm.get_velocity(tx0, teps, tt).numpy(), rtol=1e-5, atol=1e-6)
  # eps from v inverts the pair (x_t, v) back to eps, for both output kinds.
  np.testing.assert_allclose(schedule.eps_from_v(x_t, v, a_t, s_t), eps, atol=2e-5)
  np.testing.assert_allclose(
    schedule.eps_from_output(v, x_t, a_t, s_t, "v_prediction"), eps, atol=2e-5
  )
  np.testing.assert_array_equal(schedule.eps_from_output(eps, x_t, a_t, s_t, "epsilon"), eps)


def test_cfg_formula_and_broadcast():
  rng = np.random.default_rng(1)
  u, c = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  np.testing.assert_allclose(schedule.cfg(u, c, 7.5), u + 7.5 * (c - u), rtol=1e-6)
  np.testing.assert_allclose(schedule.cfg(u, c, 1.0), c, rtol=1e-6)
  scale = np.array([2.0, 100.0])
  np.testing.assert_allclose(
    schedule.cfg(u, c, scale), u + scale[:, None, None] * (c - u), rtol=1e-6, atol=1e-6
  )


def test_jit_vmap_and_traced_t():

  def step(x0, eps, t):
    a_t, s_t = schedule.coefficients(schedule.alphas_cumprod(schedule.SD_SCHEDULER), t)
    return schedule.add_noise(x0, eps, a_t, s_t)

  x0 = jnp.ones((3, 2, 5))
  eps = jnp.full((3, 2, 5), 2.0)
  t = jnp.array([[0, 10], [500, 999], [3, 4]])
  got = jax.jit(jax.vmap(step))(x0, eps, t)
  want = np.stack([step(x0[i], eps[i], t[i]) for i in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
