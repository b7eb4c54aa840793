"""Representations: what a particle is and how it becomes an image.

A `Representation` describes one particle (the train state stacks n of them on
a leading axis): how to initialise it, the camera it is seen from at a step,
how it renders from that camera, its regularisers, how its parameters are
grouped for the optimiser, and how it is exported. The train step and the
trainer call these and never ask which representation they have.

  config.representation   class                       a particle
  "nerf"                  nerf.NeRF                   hash-grid NeRF + background MLP
  "image"                 image.Image                 an image (the paper's 2D experiment)
  "dmtet"                 mesh.dmtet.DMTet            sdf + deformation on a tet grid (stage 2)
  "textured_mesh"         mesh.textured.TexturedMesh  fixed mesh + 3D texture field (stage 3)

Arrays that a representation reads but never trains (a tet grid, each
particle's fixed mesh) are its `data()`: {'shared': the same for every
particle, 'particle': stacked [n, ...]}. They travel to the jitted step as an
argument (frozen['representation']), never as constants, and `init` and
`render` see {'shared': ..., 'particle': this particle's slice}.

A representation may also keep per-particle state that is not trained (the
NeRF's occupancy grid): `init_aux` makes it, `update_aux` advances it at the
start of each step, and `render` finds it in data['aux'] ([n, ...] in
`export` and `evaluate`, which render with it too). It is checkpointed with
the rest of the train state (state['aux']).

A stage that starts from another run (config.init_from) gets `previous`, the
(config, particles) of the runs it starts from, nearest first.

A new representation: a module here with a Representation subclass (with a
`from_config(config, previous)` constructor), one entry in `make`, and its
name in the closed set of checks.RULES["representation"].
"""

import abc
from typing import Any

import jax

from vsdjax import cameras

# The previews' ring of cameras: the exports' orbit (radius, degrees).
PREVIEW_ORBIT = dict(radius=1.5, elevation=15.0, fovy=45.0)


class Representation(abc.ABC):
  """The interface of a particle representation (instances are static under jit)."""

  def data(self) -> dict:
    """{'shared': arrays of every particle, 'particle': arrays per particle [n, ...]}."""
    return {"shared": {}, "particle": {}}

  @abc.abstractmethod
  def init(self, key: jax.Array, data: dict) -> Any:
    """One particle's parameters (a pytree); data holds this particle's slice."""

  @abc.abstractmethod
  def sample_camera(self, key: jax.Array) -> cameras.Cameras:
    """The camera of one particle at one step (one camera, fields of shape [])."""

  @abc.abstractmethod
  def render(
    self, params: Any, data: dict, camera: cameras.Cameras, resolution: int, key: jax.Array | None
  ) -> dict:
    """{'rgb': [H, W, 3] in [0, 1], ...what else it renders}; key None: deterministic.

    An optional 'metrics' entry {name: []} is averaged over the particles
    into the step's metrics.
    """

  def preview_cameras(self, n: int) -> cameras.Cameras:
    """The fixed cameras [V] of the training previews (training/previews.py): n on the
    exports' orbit by default."""
    return cameras.orbit(n, **PREVIEW_ORBIT)

  def init_aux(self, params: Any, data: dict) -> Any:
    """One particle's untrained state (see the module docstring; none by default)."""
    del params, data
    return {}

  def update_aux(self, aux: Any, params: Any, data: dict, step: jax.Array, key: jax.Array) -> Any:
    """The untrained state for this step, from the parameters before its update."""
    del params, data, step, key
    return aux

  def regularisers(self, out: dict, step: jax.Array) -> dict:
    """Weighted regulariser terms {name: []} of one render at `step` (none by default)."""
    del out, step
    return {}

  def param_labels(self, params: Any) -> Any:
    """Optimiser group of each leaf ("grid" or "rest"; see train_step.particle_optimizer)."""
    return jax.tree.map(lambda _: "rest", params)

  def step_metrics(self, particles: Any) -> dict:
    """Metrics of the stacked particles after a step (none by default)."""
    del particles
    return {}

  @abc.abstractmethod
  def export(self, particles: Any, data: dict, folder: str, export_config) -> None:
    """Writes folder/particle_<i>/... for the stacked particles (host arrays)."""

  @abc.abstractmethod
  def evaluate(
    self, particles: Any, data: dict, references, sigma_ref: float, export_config, size: int
  ) -> dict:
    """eval.json against the analytic prior's references (shapes.Reference)."""


def make(config, previous=()) -> Representation:
  """The representation that `config.representation` names (previous: see the docstring)."""
  # Deferred: they import this module.
  from vsdjax.representations import image, nerf
  from vsdjax.representations.mesh import dmtet, textured

  kinds = {
    "nerf": nerf.NeRF,
    "image": image.Image,
    "dmtet": dmtet.DMTet,
    "textured_mesh": textured.TexturedMesh,
  }
  return kinds[config.representation].from_config(config, tuple(previous))
