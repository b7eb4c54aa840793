"""Discrete variance-preserving noise schedule shared by every prior.

Notation: abar_t is the cumulative product of (1 - beta_i)
for i <= t, t in {0, ..., T - 1}; a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t);
x_t = a_t * x_0 + s_t * eps. A model predicts either eps ("epsilon") or
v = a_t * eps - s_t * x_0 ("v_prediction").

Schedules are described by the fields of a diffusers `scheduler_config.json`
(`beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps`,
`trained_betas`), so a Stable Diffusion folder's own file can be passed as is.
The schedule itself is computed once on the host in float64 and returned as a
float32 numpy array; the per-step helpers are pure jnp functions that work
under `jax.jit` and `jax.vmap`. Every coefficient ([B] or a scalar) broadcasts
over the trailing dimensions of the arrays it multiplies.
"""

from collections.abc import Mapping
import math

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks

# The schedule fields of Stable Diffusion 2.1's scheduler_config.json (both the
# 512 px "base" epsilon model and the 768 px v-prediction model use it).
SD_SCHEDULER = {
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "num_train_timesteps": 1000,
}

# diffusers' defaults for fields a scheduler config leaves out.
_DEFAULTS = {
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "num_train_timesteps": 1000,
  "trained_betas": None,
  "rescale_betas_zero_snr": False,
}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Largest beta of the cosine schedule (Nichol & Dhariwal, 2021).
_MAX_COSINE_BETA = 0.999


def _cosine_betas(num_steps: int) -> np.ndarray:
  """Betas of the "squaredcos_cap_v2" (Glide / improved DDPM) schedule, [T]."""

  def alpha_bar(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array(
    [
      min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), _MAX_COSINE_BETA)
      for i in range(num_steps)
    ]
  )


def alphas_cumprod(scheduler_config: Mapping) -> np.ndarray:
  """abar_t of a diffusers scheduler config.

  Args:
    scheduler_config: mapping with the fields of a diffusers
      `scheduler_config.json`. Used: `beta_schedule` ("linear",
      "scaled_linear" or "squaredcos_cap_v2"), `beta_start`, `beta_end`,
      `num_train_timesteps`, `trained_betas` (overrides the schedule when not
      None) and `rescale_betas_zero_snr` (must be false). Missing fields take
      diffusers' defaults; other fields are ignored.

  Returns:
    [num_train_timesteps] float32, strictly decreasing, in (0, 1).

  Raises:
    ValueError: for an unknown schedule or out-of-range fields.
  """
  if not isinstance(scheduler_config, Mapping):
    raise ValueError(f"scheduler_config must be a mapping, got {type(scheduler_config).__name__}")
  config = {**_DEFAULTS, **scheduler_config}
  if config["rescale_betas_zero_snr"]:
    raise ValueError(
      "scheduler_config.rescale_betas_zero_snr=True is not "
      "supported (it makes a_t = 0 at the last step)"
    )
  num_steps = checks.check_int(
    "scheduler_config.num_train_timesteps", config["num_train_timesteps"]
  )

  if config["trained_betas"] is not None:
    betas = np.asarray(config["trained_betas"], np.float64)
    if betas.ndim != 1 or betas.size < 1:
      raise ValueError(
        f"scheduler_config.trained_betas must be a non-empty 1-D list, got shape {betas.shape}"
      )
    if not np.all((betas > 0.0) & (betas < 1.0)):
      raise ValueError("scheduler_config.trained_betas must lie in (0, 1)")
  else:
    schedule = config["beta_schedule"]
    if schedule not in _BETA_SCHEDULES:
      raise ValueError(
        f"scheduler_config.beta_schedule={schedule!r} is unknown; expected one of {_BETA_SCHEDULES}"
      )
    if schedule == "squaredcos_cap_v2":
      betas = _cosine_betas(num_steps)
    else:
      start, end = (
        checks.check_number(f"scheduler_config.{name}", config[name], 0.0, 1.0)
        for name in ("beta_start", "beta_end")
      )
      if start > end:
        raise ValueError(f"scheduler_config.beta_start={start} must not exceed beta_end={end}")
      if schedule == "linear":
        betas = np.linspace(start, end, num_steps, dtype=np.float64)
      else:  # "scaled_linear", the latent diffusion schedule.
        betas = np.linspace(math.sqrt(start), math.sqrt(end), num_steps, dtype=np.float64) ** 2
  abar = np.cumprod(1.0 - betas)  # [T]
  return abar.astype(np.float32)


def _expand(coef: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a [B] (or scalar) coefficient to broadcast against x [B, ...]."""
  coef = jnp.asarray(coef)
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def coefficients(alphas_cumprod_table: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a_t = sqrt(abar_t) and s_t = sqrt(1 - abar_t).

  Args:
    alphas_cumprod_table: [T] abar_t (see `alphas_cumprod`).
    t: [...] integer timesteps in [0, T); an out-of-range t is clamped to
      [0, T) by the gather.

  Returns:
    (a_t, s_t), each [...] float32 (the shape of t).
  """
  table = jnp.asarray(alphas_cumprod_table, jnp.float32)  # [T]
  abar = jnp.take(table, jnp.asarray(t), mode="clip")  # [...]
  return jnp.sqrt(abar), jnp.sqrt(jnp.maximum(1.0 - abar, 0.0))


def add_noise(x0: jax.Array, eps: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """x_t = a_t * x0 + s_t * eps; x0, eps [B, ...], a_t, s_t [B] -> [B, ...]."""
  return _expand(a_t, x0) * x0 + _expand(s_t, x0) * eps


def v_target(x0: jax.Array, eps: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """v = a_t * eps - s_t * x0; x0, eps [B, ...], a_t, s_t [B] -> [B, ...]."""
  return _expand(a_t, eps) * eps - _expand(s_t, x0) * x0


def eps_from_v(x_t: jax.Array, v: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """eps = s_t * x_t + a_t * v (as a_t^2 + s_t^2 = 1); [B, ...] -> [B, ...]."""
  return _expand(s_t, x_t) * x_t + _expand(a_t, v) * v


def eps_from_output(
  output: jax.Array, x_t: jax.Array, a_t: jax.Array, s_t: jax.Array, prediction_type: str
) -> jax.Array:
  """The eps prediction of a model output.

  Args:
    output: [B, ...] raw model output.
    x_t: [B, ...] the noisy input the model saw.
    a_t: [B] signal coefficient.
    s_t: [B] noise coefficient.
    prediction_type: "epsilon" (output is eps) or "v_prediction" (output is v).

  Returns:
    [B, ...] eps.
  """
  if prediction_type == "epsilon":
    return output
  return eps_from_v(x_t, output, a_t, s_t)


def cfg(eps_uncond: jax.Array, eps_cond: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance eps_u + scale * (eps_c - eps_u).

  Args:
    eps_uncond: [B, ...] unconditional prediction.
    eps_cond: [B, ...] conditional prediction.
    scale: scalar or [B] guidance weight (1 gives eps_cond).

  Returns:
    [B, ...] guided prediction.
  """
  scale = _expand(scale, eps_cond)
  return eps_uncond + scale * (eps_cond - eps_uncond)
