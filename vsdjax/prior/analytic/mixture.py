"""The analytic prior: a Gaussian mixture over images with an exact denoiser.

A stand-in for Stable Diffusion whose optimal noise prediction is known in
closed form, so the distillation machinery can be run and checked on a CPU.
It has the same call pattern as the
Stable Diffusion prior: images are encoded to a channel-first "latent"
x0 = 2 * rgb - 1 of shape [B, 3, H, W] (pixel space, the NCHW layout of SD
latents), prompts are encoded to an embedding, and `predict_eps` maps
(params, x_t, t, embedding) to eps. The role of the UNet parameters is played
by the per-camera component means.

The model. Components k = 1..K have a name, a mean image m_k [C, h, w] (given
per batch element, since it depends on the camera) and an isotropic std
sigma_k >= 0 in x0 units (0: a point mass). A prompt embedding e [K] >= 0
gives mixture weights pi_k = e_k / sum_j e_j (uniform over the components a
prompt selects). With x_t = a_t x0 + s_t eps and x0 ~ sum_k pi_k N(m_k,
sigma_k^2 I), the noisy marginal is sum_k pi_k N(a_t m_k, v_k I) with
v_k = a_t^2 sigma_k^2 + s_t^2, and the minimum-mean-squared-error noise
prediction E[eps | x_t] is

  eps*(x_t) = s_t * sum_k w_k (x_t - a_t m_k) / v_k,
  w_k = softmax_k(log pi_k - |x_t - a_t m_k|^2 / (2 v_k) - (D / 2) log v_k),

with D = C * h * w. The responsibilities w are computed in log space, so they
stay finite for D = 3 * 64 * 64 and the smallest s_t of the schedule.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks
from vsdjax.prior import schedule


@dataclasses.dataclass(frozen=True, eq=False)
class AnalyticPrior:
  """Static description of a Gaussian-mixture prior (hashable, jit-static).

  Attributes:
    names: K component names, adjectives then a noun ("red sphere"); a
      prompt selects components by them (`encode_prompts`; components sharing
      a name go together).
    sigma: K isotropic standard deviations (>= 0) around the means, x0 units.
    alphas_cumprod: [T] abar_t of the noise schedule (stored read-only);
      Stable Diffusion 2.1's by default.
    prediction_type: the model output kind; always "epsilon" (the analytic
      prior gives eps exactly).
  Equality and hash are by value, so equal priors share `jit` caches.
  """

  names: tuple[str, ...]
  sigma: tuple[float, ...]
  alphas_cumprod: np.ndarray = dataclasses.field(
    default_factory=lambda: schedule.alphas_cumprod(schedule.SD_SCHEDULER)
  )
  prediction_type: str = "epsilon"

  def __post_init__(self):
    names = _check_names(self.names, "names")
    sigma = _check_sigma(self.sigma, len(names), "sigma")
    abar = np.array(self.alphas_cumprod, dtype=np.float32)  # [T], a copy.
    if abar.ndim != 1 or abar.size < 1:
      raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {abar.shape}")
    if not np.all((abar > 0.0) & (abar < 1.0)):
      raise ValueError("alphas_cumprod must lie in the open interval (0, 1)")
    abar.setflags(write=False)
    checks.check_fields(self, prediction_type=checks.choice("epsilon"))
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "sigma", sigma)
    object.__setattr__(self, "alphas_cumprod", abar)

  @property
  def num_components(self) -> int:
    """K, the number of mixture components."""
    return len(self.names)

  def _key(self):
    return (self.names, self.sigma, self.prediction_type, self.alphas_cumprod.tobytes())

  def __eq__(self, other):
    if not isinstance(other, AnalyticPrior):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


def _check_names(names, param: str) -> tuple[str, ...]:
  """Validates component names: a non-empty sequence of non-blank strings."""
  if isinstance(names, str) or not isinstance(names, Sequence):
    raise ValueError(f"{param} must be a sequence of strings, got {names!r}")
  names = tuple(names)
  if not names:
    raise ValueError(f"{param} must name at least one component")
  for name in names:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
      raise ValueError(
        f"{param} entries must be non-blank strings without surrounding spaces, got {name!r}"
      )
  return names


def _as_floats(value, param: str) -> np.ndarray:
  """A number or nested sequence of numbers as a float64 array."""
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{param} must hold numbers, got {value!r}") from e


def _check_sigma(sigma, num_components: int, param: str) -> tuple[float, ...]:
  """Validates K finite standard deviations >= 0 (a scalar is not allowed)."""
  values = _as_floats(sigma, param)
  if values.shape != (num_components,):
    raise ValueError(
      f"{param} must have one entry per component ({num_components}), got shape {values.shape}"
    )
  if not np.all(np.isfinite(values)) or np.any(values < 0.0):
    raise ValueError(f"{param} must be finite and >= 0, got {tuple(values)}")
  return tuple(float(v) for v in values)


def make_prior(
  names: Sequence[str],
  sigma_ref: float | Sequence[float],
  scheduler_config: Mapping = schedule.SD_SCHEDULER,
) -> AnalyticPrior:
  """Builds an analytic prior.

  Args:
    names: K component names (e.g. ("sphere", "cube")).
    sigma_ref: std of the components around their means, in x0 units
      (x0 = 2 * rgb - 1); a scalar for all components or K values, >= 0.
    scheduler_config: diffusers scheduler fields (see
      `schedule.alphas_cumprod`); Stable Diffusion 2.1's by default.

  Returns:
    The prior.
  """
  names = _check_names(names, "names")
  sigma = _as_floats(sigma_ref, "sigma_ref")
  if sigma.ndim == 0:
    sigma = np.full((len(names),), sigma)
  sigma = _check_sigma(sigma, len(names), "sigma_ref")
  return AnalyticPrior(
    names=names, sigma=sigma, alphas_cumprod=schedule.alphas_cumprod(scheduler_config)
  )


def encode_prompts(prior: AnalyticPrior, prompts: Sequence[str]) -> jax.Array:
  """Prompt embeddings: masks of the selected components.

  A component name is one or more words: the last is its noun ("sphere"),
  the others its adjectives ("red" in "red sphere"). A prompt mentions a
  noun as a whole word (case-insensitive); a mention selects the components
  with that noun, and only those with the adjective, when the word just
  before it is an adjective of some component. So with a red and a blue
  sphere, "a red sphere, front view" selects the red one, "a sphere" both,
  and "a red sphere next to a cube" the red sphere and every cube. The empty
  (or blank) prompt selects every component: it is the unconditional branch
  of classifier-free guidance, as for Stable Diffusion.

  Args:
    prior: the prior.
    prompts: B prompt strings.

  Returns:
    [B, K] float32 masks (1 = selected); the mixture weights are uniform over
    the selected components.

  Raises:
    ValueError: for a prompt that selects no component.
  """
  if isinstance(prompts, str) or not isinstance(prompts, Sequence):
    raise ValueError(f"prompts must be a sequence of strings, got {prompts!r}")
  if not prompts:
    raise ValueError("prompts must hold at least one prompt")
  words = [name.lower().split() for name in prior.names]  # [K] lists: adjectives, then noun
  adjectives = {w for name in words for w in name[:-1]}
  nouns = {name[-1]: re.compile(r"(?<!\w)" + re.escape(name[-1]) + r"(?!\w)") for name in words}
  masks = []
  for prompt in prompts:
    if not isinstance(prompt, str):
      raise ValueError(f"prompts entries must be strings, got {prompt!r}")
    text = prompt.strip().lower()
    if not text:
      masks.append([1.0] * prior.num_components)
      continue
    mentions = set()  # (noun, adjective or None)
    for noun, pattern in nouns.items():
      for match in pattern.finditer(text):
        before = re.findall(r"\w+", text[: match.start()])
        adjective = before[-1] if before and before[-1] in adjectives else None
        mentions.add((noun, adjective))
    mask = [
      1.0
      if (name[-1], None) in mentions or any((name[-1], a) in mentions for a in name[:-1])
      else 0.0
      for name in words
    ]
    if not any(mask):
      raise ValueError(
        f"prompts entry {prompt!r} names no component of the "
        f"analytic prior; known names: {prior.names}"
      )
    masks.append(mask)
  return jnp.asarray(masks, dtype=jnp.float32)  # [B, K]


def _log_mixture_weights(emb: jax.Array) -> jax.Array:
  """log pi up to a constant: log(emb) where emb > 0, else -inf; [..., K]."""
  selected = emb > 0
  return jnp.where(selected, jnp.log(jnp.where(selected, emb, 1.0)), -jnp.inf)


def _posterior(prior, means, x_t, t, emb):
  """Responsibilities and the pieces of eps*.

  The squared distances |x_t - a_t m_k|^2 are of order D s_t^2 while the
  responsibilities depend on their differences, which float32 would round
  away for large D. So they are split around the pi-weighted mean of the
  component means, mbar (unselected components do not enter it): with
  r = x_t - a_t mbar and d_k = m_k - mbar,
    |x_t - a_t m_k|^2 = |r|^2 - 2 a_t r.d_k + a_t^2 |d_k|^2,
  and the terms that do not depend on d_k (|r|^2 / v_k and D log v_k) are
  taken relative to their largest value over k, which makes them exactly 0
  when all v_k are equal.

  Returns:
    w: [B, K] responsibilities.
    diff: [B, K, C, h, w] x_t - a_t m_k.
    var: [B, K] v_k = a_t^2 sigma_k^2 + s_t^2.
    s_t: [B] noise coefficient.
  """
  means = jnp.asarray(means, jnp.float32)
  x_t = jnp.asarray(x_t, jnp.float32)
  emb = jnp.asarray(emb, jnp.float32)
  a_t, s_t = schedule.coefficients(prior.alphas_cumprod, t)  # [B], [B]
  sigma = jnp.asarray(prior.sigma, jnp.float32)  # [K]
  var = jnp.square(a_t[:, None] * sigma) + jnp.square(s_t)[:, None]  # [B, K]
  a_5d = a_t[:, None, None, None, None]  # [B, 1, 1, 1, 1]
  pi = emb / jnp.sum(emb, axis=-1, keepdims=True)  # [B, K]
  centre = jnp.sum(pi[:, :, None, None, None] * means, axis=1, keepdims=True)  # [B, 1, C, h, w]
  dev = means - centre  # [B, K, C, h, w]
  resid = x_t[:, None] - a_5d * centre  # [B, 1, C, h, w]
  cross = jnp.sum(resid * dev, axis=(2, 3, 4))  # [B, K]
  dev_sq = jnp.sum(jnp.square(dev), axis=(2, 3, 4))  # [B, K]
  resid_sq = jnp.sum(jnp.square(resid), axis=(1, 2, 3, 4))  # [B]
  dim = math.prod(x_t.shape[1:])
  common = -0.5 * resid_sq[:, None] / var - 0.5 * dim * jnp.log(var)  # [B, K]
  common = common - jnp.max(common, axis=-1, keepdims=True)
  specific = (a_t[:, None] * cross - 0.5 * jnp.square(a_t)[:, None] * dev_sq) / var  # [B, K]
  logits = _log_mixture_weights(emb) + common + specific  # [B, K]
  w = jax.nn.softmax(logits, axis=-1)  # [B, K]
  diff = resid - a_5d * dev  # [B, K, C, h, w]
  return w, diff, var, s_t


def posterior_weights(
  prior: AnalyticPrior, means: jax.Array, x_t: jax.Array, t: jax.Array, emb: jax.Array
) -> jax.Array:
  """Posterior responsibilities P(k | x_t) of the selected components.

  Args:
    prior: the prior.
    means: [B, K, C, h, w] component means m_k (x0 units) for each element.
    x_t: [B, C, h, w] noisy latents.
    t: [B] integer timesteps.
    emb: [B, K] prompt embeddings (`encode_prompts`), non-negative weights
      with at least one positive entry per row.

  Returns:
    [B, K] responsibilities; rows sum to 1, 0 for unselected components.
  """
  return _posterior(prior, means, x_t, t, emb)[0]


def predict_eps(
  prior: AnalyticPrior, means: jax.Array, x_t: jax.Array, t: jax.Array, emb: jax.Array
) -> jax.Array:
  """Exact noise prediction E[eps | x_t] of the mixture.

  Args:
    prior: the prior.
    means: [B, K, C, h, w] component means m_k (x0 units) for each element;
      the counterpart of Stable Diffusion's UNet parameters.
    x_t: [B, C, h, w] noisy latents.
    t: [B] integer timesteps.
    emb: [B, K] prompt embeddings (`encode_prompts`).

  Returns:
    [B, C, h, w] eps*(x_t) = s_t * sum_k w_k (x_t - a_t m_k) / v_k.
  """
  w, diff, var, s_t = _posterior(prior, means, x_t, t, emb)
  coef = s_t[:, None] * w / var  # [B, K]
  return jnp.sum(coef[:, :, None, None, None] * diff, axis=1)  # [B, C, h, w]


def encode_images(prior: AnalyticPrior, rgb: jax.Array) -> jax.Array:
  """Images to latents: x0 = 2 * rgb - 1, channel first.

  Args:
    prior: the prior (unused; the signature matches the Stable Diffusion
      encoder, whose first argument is the VAE).
    rgb: [..., H, W, 3] images in [0, 1].

  Returns:
    [..., 3, H, W] latents in [-1, 1].
  """
  del prior
  rgb = jnp.asarray(rgb)
  return jnp.moveaxis(2.0 * rgb - 1.0, -1, -3)


def decode_latents(prior: AnalyticPrior, x: jax.Array) -> jax.Array:
  """Latents to images, the inverse of `encode_images`, clipped to [0, 1].

  Args:
    prior: the prior (unused; the signature matches the Stable Diffusion
      decoder).
    x: [..., 3, H, W] latents.

  Returns:
    [..., H, W, 3] images in [0, 1].
  """
  del prior
  x = jnp.asarray(x)
  return jnp.clip(0.5 * (jnp.moveaxis(x, -3, -1) + 1.0), 0.0, 1.0)


def sample(prior: AnalyticPrior, key: jax.Array, means: jax.Array, emb: jax.Array) -> jax.Array:
  """One clean sample x0 from the mixture (`vmap` over keys for more).

  Args:
    prior: the prior.
    key: PRNG key.
    means: [K, C, h, w] component means (x0 units).
    emb: [K] prompt embedding (`encode_prompts` row).

  Returns:
    [C, h, w] x0 = m_k + sigma_k * z, k ~ pi, z ~ N(0, I).
  """
  means = jnp.asarray(means, jnp.float32)
  emb = jnp.asarray(emb, jnp.float32)
  key_k, key_z = jax.random.split(key)
  k = jax.random.categorical(key_k, _log_mixture_weights(emb))  # []
  sigma = jnp.asarray(prior.sigma, jnp.float32)[k]  # []
  return means[k] + sigma * jax.random.normal(key_z, means.shape[1:])
