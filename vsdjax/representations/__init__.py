"""Representations: what a particle is and how it becomes an image.

A `Representation` describes one particle (the train state stacks n of them on
a leading axis): how to initialise it, the camera it is seen from at a step,
how it renders from that camera, its regularisers, how its parameters are
grouped for the optimiser, and how it is exported. The train step and the
trainer call these and never ask which representation they have.

  config.representation   class                 a particle
  "nerf"                  nerf.NeRF             hash-grid NeRF + background MLP
  "image"                 image.Image           an image (the paper's 2D experiment)

A new representation: a module here with a Representation subclass (with a
`from_config(config)` constructor), one entry in `make`, and its name in the
closed set of checks.RULES["representation"].
"""

import abc
from typing import Any

import jax

from vsdjax import cameras


class Representation(abc.ABC):
  """The interface of a particle representation (instances are static under jit)."""

  @abc.abstractmethod
  def init(self, key: jax.Array) -> Any:
    """One particle's parameters (a pytree)."""

  @abc.abstractmethod
  def sample_camera(self, key: jax.Array) -> cameras.Cameras:
    """The camera of one particle at one step (one camera, fields of shape [])."""

  @abc.abstractmethod
  def render(
    self, params: Any, camera: cameras.Cameras, resolution: int, key: jax.Array | None
  ) -> dict:
    """{'rgb': [H, W, 3] in [0, 1], ...what else it renders}; key None: deterministic."""

  def regularisers(self, out: dict) -> dict:
    """Weighted regulariser terms {name: []} of one render (none by default)."""
    del out
    return {}

  def param_labels(self, params: Any) -> Any:
    """Optimiser group of each leaf ("grid" or "rest"; see train_step.particle_optimizer)."""
    return jax.tree.map(lambda _: "rest", params)

  def step_metrics(self, particles: Any) -> dict:
    """Metrics of the stacked particles after a step (none by default)."""
    del particles
    return {}

  @abc.abstractmethod
  def export(self, particles: Any, folder: str, export_config) -> None:
    """Writes folder/particle_<i>/... for the stacked particles (host arrays)."""

  @abc.abstractmethod
  def evaluate(
    self, particles: Any, references, sigma_ref: float, export_config, size: int
  ) -> dict:
    """eval.json against the analytic prior's references (shapes.Reference)."""


def make(config) -> Representation:
  """The representation that `config.representation` names."""
  from vsdjax.representations import image, nerf  # Deferred: they import this module.

  kinds = {"nerf": nerf.NeRF, "image": image.Image}
  return kinds[config.representation].from_config(config)
