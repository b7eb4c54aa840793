"""The Prior interface: the frozen score model that the particles are distilled from.

A `Prior` is static (closed over by jit); its arrays travel in the `frozen`
dict that the train step takes as an argument (frozen['prior']). The step
calls, per particle: `encode` (render -> the space the prior works in),
`condition` (what the noise prediction needs at this camera: text embeddings
of the view prompt, or the analytic prior's reference means at the camera)
and `eps_cfg` (classifier-free guided noise prediction).

  prior.kind           class
  "stable_diffusion"   sd_prior.SDPrior         diffusers' Flax SD 2.x (VAE latents)
  "analytic"           analytic.Analytic        exact Gaussian-mixture denoiser (pixels)

A new prior: a module here with a Prior subclass, built in models.build.
"""

import abc
from typing import Any

import jax
import numpy as np

from vsdjax import cameras


class Prior(abc.ABC):
  """The interface of a frozen prior (instances are static under jit)."""

  @property
  @abc.abstractmethod
  def alphas_cumprod(self) -> np.ndarray:
    """[T] abar_t of the prior's noise schedule."""

  @abc.abstractmethod
  def encode(self, frozen: Any, rgb: jax.Array, key: jax.Array) -> jax.Array:
    """rgb [1, H, W, 3] in [0, 1] -> x0 [1, C, h, w], differentiable (key: a sampled encoder)."""

  @abc.abstractmethod
  def condition(self, frozen: Any, camera: cameras.Cameras, label: jax.Array, size: int) -> Any:
    """The conditioning of eps_cfg at one camera ([] view label; x0 is size x size)."""

  @abc.abstractmethod
  def eps_cfg(
    self, frozen: Any, x_t: jax.Array, t: jax.Array, cond: Any, scale: float
  ) -> jax.Array:
    """Classifier-free guided eps [1, C, h, w] of x_t [1, C, h, w] at t [1]."""

  def evaluate(self, representation, particles, data, config) -> dict | None:
    """eval.json's content for the trained particles, where the answer is known."""
    del representation, particles, data, config
    return None
