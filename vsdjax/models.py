"""Builds the frozen prior and the eps_phi model that a config asks for.

`build(config, key)` returns (models, frozen):
  models: static description (modules, specs, schedules) closed over by jit;
  frozen: the arrays the step reads but never updates, passed to the jitted
    step as an argument (never baked in as constants):
      'prior':     the StableDiffusion pytree (UNet and VAE params; the text
                   encoder is dropped once the prompts are encoded); {} for the
                   analytic prior
      'phi_base':  eps_phi's base UNet params ({} for SDS)
      'emb_cond':  [4, L, D] prompt conditioning per view label (cameras.VIEW_NAMES)
      'emb_uncond': [L, D] unconditional conditioning
      'phi_emb':   [4, L', D'] eps_phi's text conditioning per view label
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras, eps_phi, shapes
from vsdjax import prior as prior_lib
from vsdjax.prior import stable_diffusion

# Text conditioning of the tiny eps_phi UNet used with the analytic prior (a
# single zero token: the analytic prior has one prompt).
_TINY_CROSS_DIM = 32


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """Static parts of the score models (hashed by identity).

  Attributes:
    prior: StableDiffusion without weights (they are in `frozen`) or AnalyticPrior.
    references: the analytic prior's reference shapes (empty for SD).
    phi_unet: eps_phi's FlaxUNet2DConditionModel, None for SDS.
    phi_spec: eps_phi.EpsPhiSpec, None for SDS.
    phi_prediction_type: "epsilon" or "v_prediction".
    phi_alphas_cumprod: [T] schedule of eps_phi's base.
  """
  prior: Any
  references: tuple = ()
  phi_unet: Any = None
  phi_spec: Optional[eps_phi.EpsPhiSpec] = None
  phi_prediction_type: str = "epsilon"
  phi_alphas_cumprod: Any = None

  @property
  def is_analytic(self) -> bool:
    return isinstance(self.prior, prior_lib.AnalyticPrior)


def tiny_unet_config(channels, size: int, in_channels: int = 3) -> dict:
  """Config of a small diffusers UNet for pixel-space eps_phi (analytic prior).

  One level per entry of `channels`, attention only on the coarsest (cheap). Each width
  must be a multiple of 32 and at least 64: diffusers' Flax GroupNorm has 32
  groups, and with 32 channels every channel is its own group, so the
  normalisation removes the time (and camera) embedding's per-channel shift.
  """
  channels = tuple(int(c) for c in channels)
  if not channels or any(c < 64 or c % 32 for c in channels):
    raise ValueError("eps_phi.tiny_channels must be widths >= 64 that are multiples "
                     f"of 32 (GroupNorm has 32 groups), got {channels}")
  n = len(channels)
  return {
      "sample_size": size,
      "in_channels": in_channels,
      "out_channels": in_channels,
      "down_block_types": ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
      "block_out_channels": list(channels),
      "layers_per_block": 1,
      "attention_head_dim": 8,
      "cross_attention_dim": _TINY_CROSS_DIM,
      "use_linear_projection": True,
  }


def _dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"prior.dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def build(config, key: jax.Array):
  """(Models, frozen) for `config` (defaults.py); see the module docstring.

  Loads Stable Diffusion first, so a missing model fails at start.
  """
  kind = config.prior.kind
  vsd = config.guidance.mode == "vsd"
  if config.guidance.mode not in ("vsd", "sds"):
    raise ValueError(f"guidance.mode must be 'vsd' or 'sds', got {config.guidance.mode!r}")
  frozen = {"prior": {}, "phi_base": {}}
  if kind == "stable_diffusion":
    sd = prior_lib.load_stable_diffusion(config.prior.name, dtype=_dtype(config.prior.dtype))
    prompts = [cameras.view_prompt(config.prompt, i) if config.guidance.view_prompts
               else config.prompt for i in range(len(cameras.VIEW_NAMES))]
    emb = prior_lib.encode_prompts(sd, prompts + [""])  # [5, 77, D]
    sd = dataclasses.replace(sd, text_params={})
    frozen.update(prior=sd, emb_cond=emb[:-1], emb_uncond=emb[-1], phi_emb=emb[:-1])
    # The static copy keeps the modules and the schedule, not the weights.
    models = Models(prior=dataclasses.replace(sd, unet_params={}, vae_params={}))
    if vsd:
      base = config.eps_phi.base
      phi_sd = sd if base == "prior" else prior_lib.load_stable_diffusion(
          base, dtype=jnp.float32)
      frozen["phi_base"] = phi_sd.unet_params
      models = dataclasses.replace(
          models, phi_unet=phi_sd.unet, phi_prediction_type=phi_sd.prediction_type,
          phi_alphas_cumprod=np.asarray(phi_sd.alphas_cumprod))
  elif kind == "analytic":
    refs = shapes.parse_references(config.prior.references)
    pr = prior_lib.make_prior([r.shape for r in refs], config.prior.sigma_ref)
    cond = prior_lib.encode_prompts(pr, [config.prompt])[0]  # [K]
    frozen.update(emb_cond=jnp.tile(cond[None], (len(cameras.VIEW_NAMES), 1)),
                  emb_uncond=prior_lib.encode_prompts(pr, [""])[0],
                  phi_emb=jnp.zeros((len(cameras.VIEW_NAMES), 1, _TINY_CROSS_DIM)))
    models = Models(prior=pr, references=refs)
    if vsd:
      if config.eps_phi.base != "tiny":
        raise ValueError("with prior.kind='analytic', eps_phi.base must be 'tiny' "
                         f"(a small pixel-space UNet), got {config.eps_phi.base!r}")
      unet = stable_diffusion.unet_from_config(
          tiny_unet_config(config.eps_phi.tiny_channels, config.render.resolution))
      frozen["phi_base"] = unet.init_weights(key)
      models = dataclasses.replace(
          models, phi_unet=unet, phi_prediction_type="epsilon",
          phi_alphas_cumprod=pr.alphas_cumprod)
  else:
    raise ValueError(f"prior.kind must be 'stable_diffusion' or 'analytic', got {kind!r}")
  if vsd:
    models = dataclasses.replace(models, phi_spec=eps_phi.EpsPhiSpec(
        mode=config.eps_phi.mode, rank=config.eps_phi.rank, alpha=config.eps_phi.alpha,
        camera_dropout=config.eps_phi.camera_dropout))
  return models, frozen
