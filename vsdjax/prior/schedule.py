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
_PREDICTION_TYPES = ("epsilon", "v_prediction")
# Largest beta of the cosine schedule (as in diffusers and Nichol & Dhariwal).
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
  num_steps = config["num_train_timesteps"]
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(
      f"scheduler_config.num_train_timesteps must be a positive int, got {num_steps!r}"
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
      betas = _cosine_betas(int(num_steps))
    else:
      start, end = config["beta_start"], config["beta_end"]
      for name, value in (("beta_start", start), ("beta_end", end)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and 0.0 < value < 1.0):
          raise ValueError(f"scheduler_config.{name} must be a number in (0, 1), got {value!r}")
      if start > end:
        raise ValueError(f"scheduler_config.beta_start={start} must not exceed beta_end={end}")
      if schedule == "linear":
        betas = np.linspace(start, end, num_steps, dtype=np.float64)
      else:  # "scaled_linear", the latent diffusion schedule.
        betas = np.linspace(math.sqrt(start), math.sqrt(end), num_steps, dtype=np.float64) ** 2
  abar = np.cumprod(1.0 - betas)  # [T]
  return abar.astype(np.float32)


def _expand(coef: jax.Array, x: jax.Array, name: str) -> jax.Array:
  """Reshapes a [B] (or scalar) coefficient to broadcast against x [B, ...]."""
  coef = jnp.asarray(coef)
  if coef.shape != x.shape[: coef.ndim]:
    raise ValueError(
      f"{name} has shape {coef.shape}, expected a prefix of the array shape {x.shape}"
    )
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _check_same_shape(**arrays: jax.Array) -> None:
  shapes = {name: jnp.shape(a) for name, a in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"shapes must match, got {shapes}")


def coefficients(alphas_cumprod_table: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a_t = sqrt(abar_t) and s_t = sqrt(1 - abar_t).

  Args:
    alphas_cumprod_table: [T] abar_t (see `alphas_cumprod`).
    t: [...] integer timesteps in [0, T). Checked when concrete; under `jit`
      an out-of-range t is clamped to [0, T) by the gather.

  Returns:
    (a_t, s_t), each [...] float32 (the shape of t).
  """
  table = jnp.asarray(alphas_cumprod_table, jnp.float32)  # [T]
  if table.ndim != 1:
    raise ValueError(f"alphas_cumprod must be 1-D, got shape {table.shape}")
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
  if not isinstance(t, jax.core.Tracer) and t.size:
    t_host = np.asarray(t)
    if t_host.min() < 0 or t_host.max() >= table.shape[0]:
      raise ValueError(
        f"t must lie in [0, {table.shape[0]}), got values in [{t_host.min()}, {t_host.max()}]"
      )
  abar = jnp.take(table, t, mode="clip")  # [...]
  return jnp.sqrt(abar), jnp.sqrt(jnp.maximum(1.0 - abar, 0.0))


def add_noise(x0: jax.Array, eps: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """x_t = a_t * x0 + s_t * eps; x0, eps [B, ...], a_t, s_t [B] -> [B, ...]."""
  _check_same_shape(x0=x0, eps=eps)
  return _expand(a_t, x0, "a_t") * x0 + _expand(s_t, x0, "s_t") * eps


def v_target(x0: jax.Array, eps: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """v = a_t * eps - s_t * x0; x0, eps [B, ...], a_t, s_t [B] -> [B, ...]."""
  _check_same_shape(x0=x0, eps=eps)
  return _expand(a_t, eps, "a_t") * eps - _expand(s_t, x0, "s_t") * x0


def eps_from_v(x_t: jax.Array, v: jax.Array, a_t: jax.Array, s_t: jax.Array) -> jax.Array:
  """eps = s_t * x_t + a_t * v (as a_t^2 + s_t^2 = 1); [B, ...] -> [B, ...]."""
  _check_same_shape(x_t=x_t, v=v)
  return _expand(s_t, x_t, "s_t") * x_t + _expand(a_t, v, "a_t") * v


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
  if prediction_type not in _PREDICTION_TYPES:
    raise ValueError(
      f"prediction_type={prediction_type!r} is unknown; expected one of {_PREDICTION_TYPES}"
    )
  _check_same_shape(output=output, x_t=x_t)
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
  _check_same_shape(eps_uncond=eps_uncond, eps_cond=eps_cond)
  scale = _expand(scale, eps_cond, "scale")
  return eps_uncond + scale * (eps_cond - eps_uncond)
