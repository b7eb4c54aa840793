"""Score distillation maths: the t schedule, the weighting and the SDS/VSD gradient.

SDS and VSD share one update:

  grad_x0 = w(t) * (eps_hat_pretrained(x_t, t, y_c) - eps_target),

with eps_target = eps_phi(x_t, t, c, y) for VSD and the sampled noise eps for SDS
(VSD with a Dirac variational distribution). The particle loss is the surrogate
0.5 * |x0 - stop_gradient(x0 - grad)|^2 whose gradient w.r.t. x0 is `grad`; the
score networks are never differentiated.
"""

import jax
import jax.numpy as jnp


def t_bounds(step, *, t_min, t_max, t_max_after, t_switch_step, t_anneal_steps):
  """The (t_min, t_max) range of step `step` as fractions of the diffusion steps.

  Hard switch from t_max to t_max_after at t_switch_step (ProlificDreamer), or,
  with t_anneal_steps > 0, a linear anneal over the t_anneal_steps steps that end
  at t_switch_step. Works on traced steps.
  """
  step = jnp.asarray(step, jnp.float32)
  if t_anneal_steps > 0:
    frac = jnp.clip((step - (t_switch_step - t_anneal_steps)) / t_anneal_steps, 0.0, 1.0)
  else:
    frac = (step >= t_switch_step).astype(jnp.float32)
  return jnp.float32(t_min), t_max + frac * (t_max_after - t_max)


def sample_t(key, t_lo, t_hi, num_timesteps, shape=()):
  """Integer timesteps uniform in [round(t_lo T), round(t_hi T)], T = num_timesteps.

  Both ends are clipped to the schedule's steps {0, ..., T - 1}, so t_hi = 1
  draws at most T - 1.
  """
  lo = jnp.clip(jnp.round(t_lo * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
  hi = jnp.clip(jnp.round(t_hi * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
  return jax.random.randint(key, shape, lo, hi + 1)


def weight(abar_t):
  """w(t) = 1 - abar_t (= s_t^2), the DreamFusion / ProlificDreamer weighting."""
  return 1.0 - abar_t


def guidance_grad(eps_pretrained, eps_target, w_t, clip=0.0):
  """grad [B, C, h, w] = w(t) (eps_pretrained - eps_target), made finite and optionally clipped.

  Non-finite entries become 0 so that one bad prediction does not poison the
  particle's Adam state; how many there were is returned, for the trainer to
  stop on (it is never hidden).

  Args:
    eps_pretrained: [B, C, h, w] CFG noise prediction of the frozen prior.
    eps_target: [B, C, h, w] eps_phi's prediction (VSD) or the sampled noise (SDS).
    w_t: [B] weights.
    clip: > 0 clamps each entry to [-clip, clip], as threestudio's grad_clip
      and the official code's do.

  Returns:
    (grad [B, C, h, w], n_nonfinite [] int32: entries that were NaN or infinite).
  """
  grad = w_t[:, None, None, None] * (eps_pretrained - eps_target)
  finite = jnp.isfinite(grad)
  n_nonfinite = jnp.sum(~finite, dtype=jnp.int32)
  grad = jnp.where(finite, grad, 0.0)
  if clip > 0:
    grad = jnp.clip(grad, -clip, clip)
  return grad, n_nonfinite


def surrogate_loss(x0, grad):
  """0.5 |x0 - sg(x0 - grad)|^2 / B: its gradient w.r.t. x0 [B, ...] is grad / B."""
  target = jax.lax.stop_gradient(x0 - grad)
  return 0.5 * jnp.sum((x0 - target) ** 2) / x0.shape[0]
