"""The image representation: a particle is an image (the paper's 2D experiment).

The parameters are the image in x0 units (x0 = 2 rgb - 1, channel first, the
analytic prior's pixel space), seen from one fixed camera: the render is the
image itself, so the prior's encoding gives back x0.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras
from vsdjax.prior.analytic import evaluate, shapes
from vsdjax.representations import Representation
from vsdjax.representations.nerf import export

# The fixed camera: the analytic references are rendered from it and eps_phi is
# conditioned on it.
CAMERA = dict(radius=1.3, elevation=15.0, azimuth=30.0, fovy=50.0)


@dataclasses.dataclass(frozen=True)
class Image(Representation):
  """One particle = {'image': [3, size, size]} in x0 units, initialised N(0, 0.5^2)."""

  size: int

  @classmethod
  def from_config(cls, config, previous=()) -> "Image":
    del previous
    return cls(size=config.render.resolution)

  def init(self, key, data):
    del data
    return {"image": 0.5 * jax.random.normal(key, (3, self.size, self.size))}

  def sample_camera(self, key):
    del key
    return cameras.from_spherical(**CAMERA)

  def preview_cameras(self, n):
    del n  # Every camera sees the same image: the fixed one alone.
    return jax.tree.map(lambda v: jnp.asarray(v)[None], self.sample_camera(None))

  def render(self, params, data, camera, resolution, key):
    del data, camera, resolution, key  # The image is its own render.
    return {"rgb": 0.5 * (jnp.transpose(params["image"], (1, 2, 0)) + 1.0)}  # [h, w, 3]

  def step_metrics(self, particles):
    # Per-pixel std across particles (eval.json's "spread").
    return {"particle_spread": jnp.mean(jnp.std(particles["image"], axis=0))}

  def export(self, particles, data, folder, export_config):
    del data, export_config
    for i, x0 in enumerate(particles["image"]):
      export.export_image(x0, os.path.join(folder, f"particle_{i}", "image.png"))

  def evaluate(self, particles, data, references, sigma_ref, export_config, size):
    del data, export_config, size
    cam = self.sample_camera(None)
    rgb = shapes.render_views(references, cam.c2w, cam.fovy, self.size, self.size)["rgb"]
    means = np.moveaxis(2.0 * np.asarray(rgb) - 1.0, -1, 1)  # [K, 3, h, w]
    return evaluate.evaluate_2d(particles["image"], means, [r.shape for r in references], sigma_ref)
