"""Tests of the analytic (Gaussian-mixture) prior against independent checks.

The references here are written from the model definition (x0 ~ sum_k pi_k
N(m_k, sigma_k^2 I), x_t = a_t x0 + s_t eps) in float64 numpy: the closed-form
posterior with its own log-sum-exp, a Monte Carlo check of E[eps | x_t], and
finite differences of log p(x_t).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax import prior as priors
from vsdjax.prior import schedule
from vsdjax.prior.analytic import mixture as analytic

NAMES = ("sphere", "cube", "torus")
SIGMA = (0.0, 0.1, 0.5)

# Compiled once per prior and shape (eager mode would compile op by op).
_predict = jax.jit(analytic.predict_eps, static_argnums=0)
_weights = jax.jit(analytic.posterior_weights, static_argnums=0)


@pytest.fixture(scope="module")
def prior():
  return analytic.make_prior(NAMES, SIGMA)


def _coefs(prior, t):
  abar = prior.alphas_cumprod.astype(np.float64)[np.asarray(t)]
  return np.sqrt(abar), np.sqrt(1.0 - abar)


def _log_components(prior, means, x, t, emb):
  """float64 log(pi_k N(x; a m_k, v_k I)), [B, K]; -inf where unselected."""
  means, x = np.asarray(means, np.float64), np.asarray(x, np.float64)
  emb = np.asarray(emb, np.float64)
  a, s = _coefs(prior, t)
  dim = x[0].size
  out = np.full(emb.shape, -np.inf)
  for b in range(x.shape[0]):
    for k, sigma in enumerate(prior.sigma):
      if emb[b, k] <= 0:
        continue
      var = a[b] ** 2 * sigma**2 + s[b] ** 2
      sq = np.sum((x[b] - a[b] * means[b, k]) ** 2)
      out[b, k] = (
        np.log(emb[b, k] / emb[b].sum()) - 0.5 * sq / var - 0.5 * dim * np.log(2 * np.pi * var)
      )
  return out


def _logsumexp(logits):
  top = np.max(logits, axis=-1, keepdims=True)
  return top[..., 0] + np.log(np.sum(np.exp(logits - top), axis=-1))


def _reference_eps(prior, means, x, t, emb):
  """float64 closed-form posterior: (eps [B, C, h, w], weights [B, K])."""
  logits = _log_components(prior, means, x, t, emb)
  w = np.exp(logits - _logsumexp(logits)[:, None])
  a, s = _coefs(prior, t)
  eps = np.zeros(np.shape(x))
  for b in range(eps.shape[0]):
    for k, sigma in enumerate(prior.sigma):
      var = a[b] ** 2 * sigma**2 + s[b] ** 2
      eps[b] += s[b] * w[b, k] * (x[b] - a[b] * means[b, k]) / var
  return eps, w


def _noisy_batch(prior, rng, shape, t, spread):
  """Per-element means [B, K, *shape] and x_t [B, *shape] from the model."""
  batch = len(t)
  base = rng.uniform(-1, 1, size=(batch, 1) + shape)
  means = base + spread * rng.normal(size=(batch, len(prior.sigma)) + shape)
  k = rng.integers(0, len(prior.sigma), size=batch)
  x0 = means[np.arange(batch), k] + np.asarray(prior.sigma)[k].reshape(
    (batch,) + (1,) * len(shape)
  ) * rng.normal(size=(batch,) + shape)
  a, s = _coefs(prior, t)
  expand = (batch,) + (1,) * len(shape)
  x_t = a.reshape(expand) * x0 + s.reshape(expand) * rng.normal(size=(batch,) + shape)
  return means.astype(np.float32), x_t.astype(np.float32)


@pytest.mark.parametrize("shape, spread", [((3, 4, 5), 0.5), ((3, 64, 64), 0.02)])
def test_eps_matches_closed_form(prior, shape, spread):
  rng = np.random.default_rng(0)
  t = np.array([0, 5, 100, 400, 700, 900, 999, 999, 600])
  means, x_t = _noisy_batch(prior, rng, shape, t, spread)
  emb = np.ones((len(t), 3), np.float32)
  emb[-2] = (1.0, 0.0, 1.0)  # A prompt selecting two of the components.
  emb[-1] = (2.0, 1.0, 0.5)  # Non-uniform mixture weights.
  eps = _predict(prior, means, x_t, jnp.asarray(t), emb)
  w = _weights(prior, means, x_t, jnp.asarray(t), emb)
  ref_eps, ref_w = _reference_eps(prior, means, x_t, t, emb)
  # The batch covers both regimes: one-hot at small t, mixing at large t.
  assert np.all(ref_w[:2].max(axis=1) > 0.999)
  assert np.min(ref_w.max(axis=1)) < 0.8
  assert ref_w[-2, 1] == 0.0 and np.asarray(w)[-2, 1] == 0.0
  assert eps.shape == x_t.shape and eps.dtype == jnp.float32
  np.testing.assert_allclose(w, ref_w, atol=2e-4)
  np.testing.assert_allclose(eps, ref_eps, rtol=1e-4, atol=5e-5)


def test_monte_carlo_conditional_expectation():
  """E[(eps - eps*(x_t)) f(x_t)] = 0 for every test function f of (x_t, t).

  That orthogonality characterises eps* = E[eps | x_t]; it is checked on a
  set of features, each as a z-score of the Monte Carlo mean. Two wrong
  predictors (wrong sigma, responsibilities ignored) must fail the same check.
  """
  prior = analytic.make_prior(("a", "b"), (0.0, 0.4))
  m = np.array([[-0.6, 0.2, 0.5, -0.1], [0.4, -0.5, 0.1, 0.7]])  # [K, D]
  ts = np.array([100, 400, 600, 750, 900])
  n = 50_000
  rng = np.random.default_rng(1)
  k = rng.integers(0, 2, size=n)
  x0 = m[k] + np.array([0.0, 0.4])[k, None] * rng.normal(size=(n, 4))
  eps = rng.normal(size=(n, 4))
  t = ts[rng.integers(0, len(ts), size=n)]
  a, s = _coefs(prior, t)
  x_t = a[:, None] * x0 + s[:, None] * eps  # [n, D]
  means = np.broadcast_to(m.reshape(1, 2, 1, 2, 2), (n, 2, 1, 2, 2))
  emb = np.ones((n, 2), np.float32)

  def max_z(pred_prior):
    eps_hat = pred_prior(
      means.astype(np.float32), x_t.reshape(n, 1, 2, 2).astype(np.float32), jnp.asarray(t), emb
    )
    resid = eps - np.asarray(eps_hat, np.float64).reshape(n, 4)  # [n, D]
    feats = [np.ones(n)] + [x_t[:, i] for i in range(4)]
    feats += [x_t[:, i] ** 2 for i in range(4)]
    feats += [np.tanh(2 * x_t @ (m[1] - m[0]))]
    feats += [np.exp(-np.sum((x_t - a[:, None] * m[j]) ** 2, 1)) for j in (0, 1)]
    worst = 0.0
    for t_value in ts:
      sel = t == t_value
      for f in feats:
        prod = resid[sel] * f[sel, None]  # [n_t, D]
        z = prod.mean(0) / (prod.std(0) / np.sqrt(sel.sum()))
        worst = max(worst, np.abs(z).max())
    return worst

  assert max_z(functools.partial(_predict, prior)) < 5.0
  wrong_sigma = analytic.make_prior(("a", "b"), (0.0, 0.0))
  assert max_z(functools.partial(_predict, wrong_sigma)) > 10.0

  def uniform_weights(means, x_t, t, emb):
    del emb
    one_hot = np.eye(2, dtype=np.float32)
    per_k = [_predict(prior, means, x_t, t, np.broadcast_to(one_hot[j], (n, 2))) for j in (0, 1)]
    return 0.5 * (per_k[0] + per_k[1])

  assert max_z(uniform_weights) > 10.0


def test_eps_is_the_tweedie_score(prior):
  """-eps*/s_t equals the finite-difference gradient of log p(x_t)."""
  rng = np.random.default_rng(2)
  shape = (1, 2, 3)
  t = np.array([20, 300, 800, 300])
  means, x_t = _noisy_batch(prior, rng, shape, t, 0.4)
  emb = np.ones((4, 3), np.float32)
  emb[-1] = (0.0, 1.0, 1.0)
  eps = np.asarray(_predict(prior, means, x_t, jnp.asarray(t), emb))
  _, s = _coefs(prior, t)
  score = -eps / s[:, None, None, None]
  x64 = x_t.astype(np.float64)
  grad = np.zeros_like(x64)
  h = 1e-4
  for idx in np.ndindex(*shape):
    step = np.zeros_like(x64)
    step[(slice(None),) + idx] = h
    up = _logsumexp(_log_components(prior, means, x64 + step, t, emb))
    down = _logsumexp(_log_components(prior, means, x64 - step, t, emb))
    grad[(slice(None),) + idx] = (up - down) / (2 * h)
  np.testing.assert_allclose(score, grad, rtol=1e-4, atol=1e-4 * np.abs(grad).max())


def test_prompt_masks_and_guidance(prior):
  emb = analytic.encode_prompts(
    prior, ["", "sphere", "A Sphere, front view", "a cube next to a torus", "  "]
  )
  np.testing.assert_array_equal(emb, [[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
  assert emb.dtype == jnp.float32
  for bad in ("a hamburger", "spheres"):
    with pytest.raises(ValueError, match=f"'{bad}'.*'sphere', 'cube', 'torus'"):
      analytic.encode_prompts(prior, ["", bad])
  with pytest.raises(ValueError, match="prompts"):
    analytic.encode_prompts(prior, "sphere")

  rng = np.random.default_rng(3)
  t = np.array([50, 500, 950])
  means, x_t = _noisy_batch(prior, rng, (3, 6, 4), t, 0.5)
  uncond = np.asarray(analytic.encode_prompts(prior, [""] * 3))
  cond = np.asarray(analytic.encode_prompts(prior, ["a sphere"] * 3))
  eps_u = _predict(prior, means, x_t, jnp.asarray(t), uncond)
  eps_c = _predict(prior, means, x_t, jnp.asarray(t), cond)
  ref_u, _ = _reference_eps(prior, means, x_t, t, uncond)
  ref_c, _ = _reference_eps(prior, means, x_t, t, cond)
  np.testing.assert_allclose(
    schedule.cfg(eps_u, eps_c, 7.5), ref_u + 7.5 * (ref_c - ref_u), rtol=1e-4, atol=5e-4
  )
  # The prior-agnostic CFG (one call of batch 2B) gives the same.
  guided = priors.predict_eps_cfg(prior, means, x_t, t, cond, uncond, 7.5)
  np.testing.assert_allclose(guided, ref_u + 7.5 * (ref_c - ref_u), rtol=1e-4, atol=5e-4)
  # One point mass selected: eps = (x_t - a_t m) / s_t exactly, whatever the
  # means of the unselected components are.
  a, s = _coefs(prior, t)
  single = (x_t - a[:, None, None, None] * means[:, 0]) / s[:, None, None, None]
  np.testing.assert_allclose(eps_c, single, rtol=1e-5, atol=1e-5)
  moved = means.copy()
  moved[:, 1:] += 3.0
  np.testing.assert_allclose(
    _predict(prior, moved, x_t, jnp.asarray(t), cond), eps_c, rtol=1e-6, atol=1e-6
  )


def test_colour_prompts_select_and_guide():
  # Components named as models.build names them (shapes.component_name).
  prior = analytic.make_prior(("red sphere", "blue sphere", "blue cube"), (0.0, 0.1, 0.0))
  prompts = {
    "": [1, 1, 1],
    "a red sphere": [1, 0, 0],
    "A Blue Sphere, side view": [0, 1, 0],
    "a sphere": [1, 1, 0],
    "a cube": [0, 0, 1],
    "a red sphere next to a cube": [1, 0, 1],
  }
  emb = analytic.encode_prompts(prior, list(prompts))
  np.testing.assert_array_equal(emb, list(prompts.values()))
  for bad in ("a red cube", "blue"):
    with pytest.raises(ValueError, match=f"'{bad}'.*'red sphere', 'blue sphere', 'blue cube'"):
      analytic.encode_prompts(prior, [bad])

  # CFG between "a red sphere" and "" against the float64 closed form.
  rng = np.random.default_rng(5)
  t = np.array([100, 600, 900])
  means, x_t = _noisy_batch(prior, rng, (3, 5, 4), t, 0.5)
  cond = np.asarray(analytic.encode_prompts(prior, ["a red sphere"] * 3))
  uncond = np.asarray(analytic.encode_prompts(prior, [""] * 3))
  ref_u, _ = _reference_eps(prior, means, x_t, t, uncond)
  ref_c, _ = _reference_eps(prior, means, x_t, t, cond)
  guided = priors.predict_eps_cfg(prior, means, x_t, t, cond, uncond, 100.0)
  np.testing.assert_allclose(guided, ref_u + 100.0 * (ref_c - ref_u), rtol=1e-4, atol=2e-2)
  assert np.max(np.abs(ref_c - ref_u)) > 0.01  # the prompt changes the prediction

  # With point masses the guided x0 prediction extrapolates from the
  # unconditional posterior mean through the red sphere: the saturation of
  # high CFG, x0_cfg = m_red + (scale - 1) (m_red - sum_k w_k m_k).
  points = analytic.make_prior(prior.names, (0.0, 0.0, 0.0))
  ref_u, w_u = _reference_eps(points, means, x_t, t, uncond)
  guided = np.asarray(priors.predict_eps_cfg(points, means, x_t, t, cond, uncond, 7.5))
  a, s = _coefs(points, t)
  x0 = (x_t - s[:, None, None, None] * guided) / a[:, None, None, None]
  mbar = np.einsum("bk,bkchw->bchw", w_u, means)
  np.testing.assert_allclose(x0, means[:, 0] + 6.5 * (means[:, 0] - mbar), rtol=1e-3, atol=2e-3)


def test_encode_decode_layout_and_round_trip(prior):
  rng = np.random.default_rng(4)
  rgb = rng.uniform(size=(2, 5, 7, 3)).astype(np.float32)
  x = np.asarray(analytic.encode_images(prior, rgb))
  assert x.shape == (2, 3, 5, 7)
  for b, c, i, j in np.ndindex(*x.shape):
    assert x[b, c, i, j] == pytest.approx(2 * rgb[b, i, j, c] - 1, abs=1e-6)
  np.testing.assert_allclose(analytic.decode_latents(prior, x), rgb, atol=1e-6)
  out = analytic.decode_latents(prior, np.stack([x[0] * 0 + 3, x[0] * 0 - 3]))
  np.testing.assert_array_equal(out[0], 1.0)
  np.testing.assert_array_equal(out[1], 0.0)


def test_sample_frequencies_and_spread():
  prior = analytic.make_prior(("a", "b"), (0.0, 0.3))
  means = np.stack([np.full((1, 4, 4), -1.0), np.full((1, 4, 4), 1.0)])
  n = 4000

  @jax.jit
  def draw(emb):
    keys = jax.random.split(jax.random.key(0), n)
    return jax.vmap(lambda k: analytic.sample(prior, k, means, emb))(keys)

  x0 = np.asarray(draw(jnp.array([1.0, 3.0])))
  assert x0.shape == (n, 1, 4, 4)
  second = x0.mean(axis=(1, 2, 3)) > 0
  assert abs(second.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
  np.testing.assert_array_equal(x0[~second], -1.0)  # Point mass.
  assert abs((x0[second] - 1.0).std() - 0.3) < 0.01
  only_b = np.asarray(draw(jnp.array([0.0, 1.0])))
  assert np.all(only_b.mean(axis=(1, 2, 3)) > 0)


def test_jit_and_vmap(prior):
  rng = np.random.default_rng(5)
  t = np.array([10, 500, 990, 700, 300, 999])
  means, x_t = _noisy_batch(prior, rng, (3, 4, 4), t, 0.5)
  emb = np.ones((6, 3), np.float32)
  ref, _ = _reference_eps(prior, means, x_t, t, emb)
  np.testing.assert_allclose(
    _predict(prior, means, x_t, jnp.asarray(t), emb), ref, rtol=1e-4, atol=5e-5
  )
  # vmap over a leading particle axis of size 3 with batch 2 each, t traced.
  split = lambda a: a.reshape((3, 2) + a.shape[1:])
  vmapped = jax.jit(jax.vmap(functools.partial(analytic.predict_eps, prior)))(
    split(means), split(x_t), split(jnp.asarray(t)), split(emb)
  )
  np.testing.assert_allclose(vmapped.reshape(ref.shape), ref, rtol=1e-4, atol=5e-5)
  # Equal priors are equal and hash alike, so jit caches are shared.
  again = analytic.make_prior(list(NAMES), list(SIGMA))
  assert again == prior and hash(again) == hash(prior)
  assert analytic.make_prior(NAMES, 0.1) != prior
  assert analytic.AnalyticPrior(NAMES, SIGMA) == prior  # Default schedule.


def test_validation_errors(prior):
  with pytest.raises(ValueError, match="names"):
    analytic.make_prior("sphere", 0.0)
  with pytest.raises(ValueError, match="names"):
    analytic.make_prior(["sphere", " cube"], 0.0)
  with pytest.raises(ValueError, match="names"):
    analytic.make_prior([], 0.0)
  for bad in (-0.1, [0.1, 0.2], [0.0, float("nan"), 0.1], [[0.1] * 3], "x"):
    with pytest.raises(ValueError, match="sigma_ref"):
      analytic.make_prior(NAMES, bad)
  with pytest.raises(ValueError, match="beta_schedule"):
    analytic.make_prior(NAMES, 0.0, {"beta_schedule": "karras"})
  with pytest.raises(ValueError, match="prediction_type"):
    analytic.AnalyticPrior(NAMES, SIGMA, prior.alphas_cumprod, "v_prediction")
  with pytest.raises(ValueError, match="alphas_cumprod"):
    analytic.AnalyticPrior(NAMES, SIGMA, np.linspace(1.0, 0.1, 10))
  with pytest.raises(ValueError, match="sigma"):
    analytic.AnalyticPrior(NAMES, (0.0, 0.1), prior.alphas_cumprod)
