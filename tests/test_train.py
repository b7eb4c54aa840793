"""End to end: the trainer on the analytic prior with a tiny config.

Checks the work-directory contract, that a resumed run ends with the same
parameters as an uninterrupted one, that the step compiles once, that SDS is
the same step with the switch, the 2D mode, and the non-finite stop.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import leaves, tiny_config
from vsdjax import representations, train
from vsdjax.prior import analytic as analytic_prior
from vsdjax.training import models, train_step


@pytest.mark.slow
def test_run_workdir_and_resume(tmp_path):
  # With the occupancy grid (updated at steps 0 and 2): state['aux'] resumes bit-exact too.
  cfg = lambda **kw: tiny_config(  # noqa: E731
    **{"render.occupancy_grid": 8, "render.occupancy_every": 2, **kw}
  )
  full = train.train_and_evaluate(cfg(), str(tmp_path / "full"))
  assert np.asarray(full["aux"]["occupancy"]).max() > 0
  # Interrupted after 2 steps (checkpointed), then the same config again.
  train.train_and_evaluate(cfg(steps=2), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(cfg(), str(tmp_path / "resumed"))
  for a, b in zip(leaves(full), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  run = tmp_path / "resumed"
  assert json.loads((run / "config.json").read_text())["n_particles"] == 2
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]
  result = json.loads((run / "final" / "eval.json").read_text())
  assert len(result["particles"]) == 2
  assert {p["nearest"] for p in result["particles"]} <= {"sphere", "cube"}
  for i in range(2):
    d = run / "final" / f"particle_{i}"
    assert (d / "video.mp4").exists() and list((d / "views").glob("*.png"))


def test_particle_weight_decay_is_decoupled_and_per_group():
  labels = lambda p: {"tables": "grid", "w": "rest"}  # noqa: E731
  rep = type("Rep", (), {"param_labels": staticmethod(labels)})
  params = {"tables": jnp.array([0.5, -2.0]), "w": jnp.array([[1.5, 0.0]])}
  grads = {"tables": jnp.array([0.3, -0.1]), "w": jnp.array([[-2.0, 1.0]])}
  for decay in (0.0, 0.1):
    c = tiny_config(**{"optim.weight_decay": decay})
    opt = train_step.particle_optimizer(c, rep)
    updates, _ = opt.update(grads, opt.init(params), params)
    for name, lr in (("tables", c.optim.grid_lr), ("w", c.optim.lr)):
      g, p = np.asarray(grads[name], np.float64), np.asarray(params[name], np.float64)
      # Adam's first step: m_hat = g, v_hat = g^2; then the decay of the parameter itself.
      expected = -lr * (g / (np.abs(g) + c.optim.eps) + decay * p)
      np.testing.assert_allclose(updates[name], expected, rtol=1e-5)


@pytest.mark.slow
def test_step_compiles_once_and_sds_is_the_same_step():
  for mode in ("vsd", "sds"):
    c = tiny_config(**{"guidance.mode": mode})
    if mode == "sds":  # also exercise every regulariser (orientation needs normals)
      for name in ("sparsity", "opaque", "entropy", "orientation"):
        c.loss[name] = 0.1
      c.loss.opaque_step = 0
    m, frozen = models.build(c, jax.random.PRNGKey(0))
    state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
    step = train_step.make_train_step(c, m, frozen, c.render.resolution)
    for _ in range(3):
      state, metrics = step(state, jax.random.PRNGKey(2))
    assert step.jitted._cache_size() == 1
    assert int(state["step"]) == 3
    assert ("phi_loss" in metrics) == (mode == "vsd")
    assert (state["phi"] == {}) == (mode == "sds")
    assert np.isfinite(float(metrics["loss"]))
    if mode == "sds":
      assert all(float(metrics[f"loss_{n}"]) > 0 for n in ("sparsity", "opaque", "entropy"))
      assert float(metrics["loss_orientation"]) >= 0


def test_opaque_counts_from_its_step():
  """threestudio's schedule: the opaque term is 0 before loss.opaque_step, then its weight
  times the binary entropy of the opacity (ln 2 at opacity 1/2)."""
  rep = representations.make(tiny_config(**{"loss.opaque": 1000.0, "loss.opaque_step": 10}))
  out = {"opacity": jnp.full((4, 4), 0.5)}
  terms = jax.jit(rep.regularisers)(out, jnp.int32(9))
  assert float(terms["opaque"]) == 0.0 and float(terms["sparsity"]) > 0
  np.testing.assert_allclose(
    rep.regularisers(out, jnp.int32(10))["opaque"], 1000 * np.log(2), rtol=1e-6
  )


@pytest.mark.slow
def test_2d_mode_step():
  c = tiny_config(representation="image", n_particles=3)
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
  before = np.asarray(state["particles"]["image"])
  step = train_step.make_train_step(c, m, frozen, c.render.resolution)
  state, metrics = step(state, jax.random.PRNGKey(2))
  after = np.asarray(state["particles"]["image"])
  assert after.shape == (3, 3, 8, 8)
  assert np.all(np.abs(after - before) > 0)  # every pixel of every particle moved
  np.testing.assert_allclose(
    float(metrics["particle_spread"]), np.std(after, axis=0).mean(), rtol=1e-5
  )
  # Per-particle update norms (the update is after - before), independent of n.
  norms = np.sqrt(np.sum((after - before).astype(np.float64) ** 2, axis=(1, 2, 3)))
  for suffix, expected in (("", norms.mean()), ("_min", norms.min()), ("_max", norms.max())):
    np.testing.assert_allclose(float(metrics["particle_update_norm" + suffix]), expected, rtol=1e-4)
  assert (
    float(metrics["particle_grad_norm_min"])
    <= float(metrics["particle_grad_norm"])
    <= float(metrics["particle_grad_norm_max"])
  )
  assert int(metrics["guidance_nonfinite"]) == 0


@pytest.mark.slow
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Adam moves each pixel by ~lr: finite after step 1, the prior's eps overflows at step 2.
  c = tiny_config(
    **{"optim.lr": 1e18, "checkpoint_every": 1, "representation": "image", "guidance.mode": "sds"}
  )  # the cheapest step
  with pytest.raises(train.NonFiniteLossError, match="step 2: non-finite.*checkpoint is step 1"):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.path.exists(tmp_path / "checkpoints" / "1")
  assert not os.path.exists(tmp_path / "checkpoints" / "2")


def test_nan_from_the_prior_stops_although_the_update_is_finite(tmp_path, monkeypatch):
  # guidance_grad zeroes the NaN entries (the loss stays finite); the count stops the run.
  def nan_prior(self, frozen, x_t, *args):
    return jnp.full(x_t.shape, jnp.nan).at[..., 0, 0].set(0.0)

  monkeypatch.setattr(analytic_prior.Analytic, "eps_cfg", nan_prior)
  c = tiny_config(**{"representation": "image", "guidance.mode": "sds", "n_particles": 1})
  with pytest.raises(
    train.NonFiniteLossError, match=r"guidance_nonfinite=189 .*no checkpoint was written"
  ):
    train.train_and_evaluate(c, str(tmp_path))
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))
