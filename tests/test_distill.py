"""The SDS/VSD maths of distill.py against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsdjax.guidance import distill


def test_surrogate_gradient_is_the_guidance_gradient():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5, 6))
  grad = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  g = jax.grad(distill.surrogate_loss)(x0, grad)
  np.testing.assert_allclose(g, grad / 3, rtol=1e-6, atol=1e-7)


def test_guidance_grad_weights_cleans_and_clips():
  eps_hat = jnp.array(np.random.RandomState(0).randn(2, 3, 4, 4), jnp.float32)
  target = jnp.zeros_like(eps_hat).at[0, 0, 0, 0].set(jnp.nan)
  w = jnp.array([0.5, 2.0])
  g, n_bad = distill.guidance_grad(eps_hat, target, w)
  assert int(n_bad) == 1  # counted, so the trainer stops on it
  expected = np.asarray(w)[:, None, None, None] * np.asarray(eps_hat)
  expected[0, 0, 0, 0] = 0.0
  np.testing.assert_allclose(g, expected, rtol=1e-6)
  clipped, n_bad = distill.guidance_grad(eps_hat, jnp.zeros_like(eps_hat), w, clip=1.0)
  assert int(n_bad) == 0
  full = np.asarray(w)[:, None, None, None] * np.asarray(eps_hat)
  assert np.any(np.abs(full) > 1.0) and np.any(np.abs(full) < 1.0)
  for got, want in zip(np.asarray(clipped).ravel(), full.ravel()):  # each entry clamped alone
    assert got == pytest.approx(max(-1.0, min(1.0, want)), rel=1e-6)


@pytest.mark.parametrize("anneal", [0, 100])
def test_t_bounds_switch_and_anneal(anneal):
  kw = dict(t_min=0.02, t_max=0.98, t_max_after=0.5, t_switch_step=500, t_anneal_steps=anneal)
  for step, expected in [(0, 0.98), (399, 0.98), (500, 0.5), (10_000, 0.5)]:
    lo, hi = distill.t_bounds(step, **kw)
    assert float(lo) == pytest.approx(0.02)
    assert float(hi) == pytest.approx(expected)
  lo, hi = distill.t_bounds(450, **kw)
  assert float(hi) == pytest.approx(0.98 if anneal == 0 else 0.98 - 0.5 * 0.48)


def test_sample_t_covers_the_integer_range():
  t = distill.sample_t(jax.random.PRNGKey(0), 0.02, 0.5, 1000, (20_000,))
  assert int(t.min()) == 20 and int(t.max()) == 500
  counts = np.bincount(np.asarray(t) - 20)
  assert counts.min() > 0.5 * counts.mean()  # roughly uniform


def test_sample_t_stays_inside_the_schedule():
  t = distill.sample_t(jax.random.PRNGKey(0), 0.9, 1.0, 1000, (5_000,))
  assert int(t.max()) == 999 and int(t.min()) == 900


def test_weight_is_one_minus_abar():
  np.testing.assert_allclose(distill.weight(jnp.array([0.9, 0.1])), [0.1, 0.9], rtol=1e-6)
