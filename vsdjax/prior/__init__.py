"""Frozen score models behind one interface: Stable Diffusion and the analytic prior.

  sd = prior.load_stable_diffusion(name_or_path, dtype=jnp.float32)
  emb = prior.encode_prompts(sd, ["a hamburger", ""])        # [B, 77, D]
  eps = prior.predict_eps(sd, sd.unet_params, x_t, t, emb)   # [B, 4, h, w]
  eps = prior.predict_eps_cfg(sd, sd.unet_params, x_t, t, cond, uncond, 7.5)
  lat = prior.encode_images(sd, rgb)     # [B, H, W, 3] in [0, 1] -> [B, 4, H/8, W/8]
  img = prior.decode_latents(sd, lat)    # -> [B, H, W, 3] in [0, 1]

The analytic prior (`prior.make_prior`) answers the same calls: its prompt
embeddings are component masks [B, K], its "params" are the component means
[B, K, 3, H, W] (they depend on the camera), and its latents are the pixels
(2 rgb - 1, channel first).
"""

import jax.numpy as jnp

from vsdjax.prior import schedule, stable_diffusion
from vsdjax.prior.analytic import mixture
from vsdjax.prior.analytic.mixture import AnalyticPrior, make_prior
from vsdjax.prior.stable_diffusion import StableDiffusion, load_stable_diffusion


def _module(model):
  if isinstance(model, StableDiffusion):
    return stable_diffusion
  if isinstance(model, AnalyticPrior):
    return mixture
  raise ValueError(
    f"model must be a StableDiffusion or an AnalyticPrior, got {type(model).__name__}"
  )


def encode_prompts(model, prompts):
  """Prompt conditioning: [B, 77, D] text states (SD) or [B, K] masks (analytic)."""
  return _module(model).encode_prompts(model, prompts)


def predict_eps(model, params, x_t, t, emb):
  """eps [B, C, h, w] of x_t [B, C, h, w] at integer t [B] under conditioning emb."""
  return _module(model).predict_eps(model, params, x_t, t, emb)


def predict_eps_cfg(model, params, x_t, t, emb_cond, emb_uncond, scale):
  """Classifier-free guided eps [B, C, h, w] = eps_u + scale (eps_c - eps_u).

  Both branches in one call of batch 2B.

  Args:
    model, params: as predict_eps: the UNet params (SD), shared by the batch,
      or the component means [B, K, C, H, W] (analytic), one set per example.
    x_t: [B, C, h, w]; t: [B] integer timesteps.
    emb_cond, emb_uncond: [B, ...] conditioning of the prompt and of the empty
      (or negative) prompt, as encode_prompts returns.
    scale: guidance weight, scalar or [B] (1 gives the conditional eps).
  """
  x_t, t = jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
  emb_cond, emb_uncond = jnp.asarray(emb_cond), jnp.asarray(emb_uncond)
  if emb_cond.shape != emb_uncond.shape:
    raise ValueError(
      f"emb_cond {emb_cond.shape} and emb_uncond {emb_uncond.shape} must have the same shape"
    )
  if isinstance(model, AnalyticPrior):
    params = jnp.concatenate([params, params])
  eps = predict_eps(
    model,
    params,
    jnp.concatenate([x_t, x_t]),
    jnp.concatenate([t, t]),
    jnp.concatenate([emb_uncond, emb_cond]),
  )  # [2B, C, h, w]
  eps_uncond, eps_cond = jnp.split(eps, 2)
  return schedule.cfg(eps_uncond, eps_cond, scale)


def encode_images(model, rgb):
  """rgb [B, H, W, 3] in [0, 1] -> latents [B, C, h, w] (differentiable)."""
  return _module(model).encode_images(model, rgb)


def decode_latents(model, latents):
  """latents [B, C, h, w] -> rgb [B, H, W, 3] in [0, 1]."""
  return _module(model).decode_latents(model, latents)
