"""The analytic prior: reference shapes rendered exactly at each camera, an exact denoiser.

mixture.py holds the Gaussian-mixture maths, shapes.py the procedural
reference scenes, evaluate.py eval.json; this module is its Prior.
"""

import dataclasses

import numpy as np

from vsdjax import console, prior as prior_lib
from vsdjax.prior.analytic import mixture as mixture_lib, shapes
from vsdjax.prior.base import Prior


@dataclasses.dataclass(frozen=True, eq=False)
class Analytic(Prior):
  """frozen['prior'] = {'emb_cond': [4, K] per view label, 'emb_uncond': [K]}.

  Attributes:
    mixture: mixture_lib.AnalyticPrior (component names, sigmas, schedule).
    references: the K shapes.Reference whose renders are the component means.
    render: what the means are: "rgb" (the shaded renders) or "normal" (their
      normal maps, shapes.render's 'normal_rgb').
  """

  mixture: mixture_lib.AnalyticPrior
  references: tuple
  render: str = "rgb"

  @property
  def alphas_cumprod(self):
    return np.asarray(self.mixture.alphas_cumprod)

  def encode(self, frozen, rgb, key):
    del frozen, key  # Pixels: deterministic.
    return mixture_lib.encode_images(self.mixture, rgb)

  def reference_means(self, camera, size):
    """The component means at one camera: [1, K, 3, size, size]."""
    out = shapes.render_views(self.references, camera.c2w, camera.fovy, size, size)
    rgb = out["normal_rgb" if self.render == "normal" else "rgb"]
    return mixture_lib.encode_images(self.mixture, rgb)[None]  # rgb [K, H, W, 3]

  def condition(self, frozen, camera, label, size):
    return {
      "means": self.reference_means(camera, size),
      "cond": frozen["emb_cond"][label][None],
      "uncond": frozen["emb_uncond"][None],
    }

  def eps_cfg(self, frozen, x_t, t, cond, scale):
    del frozen
    return prior_lib.predict_eps_cfg(
      self.mixture, cond["means"], x_t, t, cond["cond"], cond["uncond"], scale
    )

  def evaluate(self, representation, particles, data, config):
    console.say("evaluating the particles against the references (eval.json) ...")
    return representation.evaluate(
      particles,
      data,
      self.references,
      config.prior.sigma_ref,
      config.export,
      config.render.resolution,
    )
