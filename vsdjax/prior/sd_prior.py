"""Stable Diffusion as a Prior: VAE latents at the model's own image size, CFG on text."""

import dataclasses

import numpy as np

from vsdjax import prior as prior_lib
from vsdjax.prior import stable_diffusion as sd_lib
from vsdjax.prior.base import Prior


@dataclasses.dataclass(frozen=True, eq=False)
class SDPrior(Prior):
  """frozen['prior'] = {'sd': StableDiffusion (text encoder dropped),
  'emb_cond': [4, 77, D] per view label, 'emb_uncond': [77, D]}.

  Attributes:
    model: the StableDiffusion without weights (modules, schedule, dtype).
  """

  model: sd_lib.StableDiffusion

  @property
  def alphas_cumprod(self):
    return np.asarray(self.model.alphas_cumprod)

  def encode(self, frozen, rgb, key):
    # The render resized bilinearly to the model's size (the UNets always see
    # their native latents, 64x64 for 2.1-base), then a sample of the VAE
    # posterior (latent_dist.sample()).
    rgb = sd_lib.resize_images(rgb, sd_lib.image_size(self.model))  # [1, 512, 512, 3]
    return sd_lib.encode_images(frozen["sd"], rgb, key)

  def condition(self, frozen, camera, label, size):
    del camera, size
    return {"cond": frozen["emb_cond"][label][None], "uncond": frozen["emb_uncond"][None]}

  def eps_cfg(self, frozen, x_t, t, cond, scale):
    sd = frozen["sd"]
    return prior_lib.predict_eps_cfg(
      sd, sd.unet_params, x_t, t, cond["cond"], cond["uncond"], scale
    )
