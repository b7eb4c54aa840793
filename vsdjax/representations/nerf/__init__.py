"""The NeRF representation: hash grid + field + background, volume rendered."""

import dataclasses
import os

import jax

from vsdjax import cameras, console
from vsdjax.prior.analytic import evaluate
from vsdjax.representations import Representation
from vsdjax.representations.nerf import export, render, scene

# Regularisers of config.loss, by name: render.py functions of a flattened render.
_REGULARISERS = {
  "sparsity": render.opacity_sparsity,
  "opaque": render.opaque,
  "entropy": render.entropy,
  "orientation": render.orientation,
}


@dataclasses.dataclass(frozen=True)
class NeRF(Representation):
  """One particle = scene.init's {'field': ..., 'background': ...}.

  Attributes:
    spec: scene.SceneSpec (grid, field, renderer, shading, background).
    camera_ranges: cameras.CameraRanges the training cameras are drawn from.
    loss_weights: (name, weight) of the regularisers with weight > 0.
    ray_batch: rays per lax.map batch at training renders (0: one batch).
  """

  spec: scene.SceneSpec
  camera_ranges: cameras.CameraRanges
  loss_weights: tuple = ()
  ray_batch: int = 0

  @classmethod
  def from_config(cls, config, previous=()) -> "NeRF":
    del previous
    return cls(
      spec=scene.spec_from_config(config),
      camera_ranges=scene.camera_ranges_from_config(config),
      loss_weights=tuple((k, float(v)) for k, v in config.loss.items() if v > 0),
      ray_batch=config.render.ray_batch,
    )

  def init(self, key, data):
    del data
    return scene.init(key, self.spec)

  def sample_camera(self, key):
    return jax.tree.map(lambda v: v[0], cameras.sample(key, self.camera_ranges, 1))

  def render(self, params, data, camera, resolution, key):
    del data
    # Ray batches only when the image has more rays than one batch (lax.map of a
    # single batch costs memory for nothing).
    batch = self.ray_batch if 0 < self.ray_batch < resolution * resolution else None
    return scene.render_camera(
      params, camera.c2w, camera.fovy, resolution, resolution, self.spec, key, batch
    )

  def regularisers(self, out):
    flat = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), out)  # [H W, ...]
    return {name: w * _REGULARISERS[name](flat) for name, w in self.loss_weights}

  def param_labels(self, params):
    labels = jax.tree.map(lambda _: "rest", params)
    labels["field"]["grid"] = jax.tree.map(lambda _: "grid", params["field"]["grid"])
    return labels

  def export(self, particles, data, folder, export_config):
    del data
    e = export_config
    n = jax.tree.leaves(particles)[0].shape[0]
    for i in range(n):
      console.say(f"exporting particle {i + 1}/{n} (orbit video, views, mesh) to {folder} ...")
      export.export_particle(
        jax.tree.map(lambda v, i=i: v[i], particles),
        self.spec,
        os.path.join(folder, f"particle_{i}"),
        views=e.views,
        video_frames=e.video_frames,
        resolution=e.resolution,
        mesh_resolution=e.mesh_resolution,
        mesh_threshold=e.mesh_threshold,
      )

  def evaluate(self, particles, data, references, sigma_ref, export_config, size):
    del data, sigma_ref
    return evaluate.evaluate_3d(
      particles, self.spec, references, n_views=export_config.eval_views, size=size
    )
