"""The NeRF representation: hash grid + field + background, volume rendered."""

import dataclasses
import os

import jax
import jax.numpy as jnp

from vsdjax import cameras, console
from vsdjax.prior.analytic import evaluate
from vsdjax.representations import Representation
from vsdjax.representations.nerf import export, field as field_lib, occupancy, render, scene

# Regularisers of config.loss, by name: render.py functions of a flattened render.
_REGULARISERS = {
  "sparsity": render.opacity_sparsity,
  "opaque": render.opaque,
  "entropy": render.entropy,
  "orientation": render.orientation,
}


@dataclasses.dataclass(frozen=True)
class OccupancySpec:
  """Empty-space skipping (occupancy.py): training renders, exports and evaluations.

  Attributes:
    resolution: G, cells per axis of the grid (0: off, samples over whole rays).
    threshold: a cell is occupied when its opacity's moving maximum exceeds
      min(threshold, the grid's mean).
    decay: the moving maximum's decay per update.
    every: steps between updates (the first at step 0).
  """

  resolution: int = 0
  threshold: float = 0.01
  decay: float = 0.95
  every: int = 16


@dataclasses.dataclass(frozen=True)
class NeRF(Representation):
  """One particle = scene.init's {'field': ..., 'background': ...}.

  Attributes:
    spec: scene.SceneSpec (grid, field, renderer, shading, background).
    camera_ranges: cameras.CameraRanges the training cameras are drawn from.
    loss_weights: (name, weight) of the regularisers with weight > 0.
    opaque_step: the "opaque" regulariser counts from this step on (0 before).
    ray_batch: rays per lax.map batch at training renders (0: one batch).
    occupancy: OccupancySpec of the empty-space skipping (resolution 0: off).
  """

  spec: scene.SceneSpec
  camera_ranges: cameras.CameraRanges
  loss_weights: tuple = ()
  opaque_step: int = 0
  ray_batch: int = 0
  occupancy: OccupancySpec = OccupancySpec()

  @classmethod
  def from_config(cls, config, previous=()) -> "NeRF":
    del previous
    return cls(
      spec=scene.spec_from_config(config),
      camera_ranges=scene.camera_ranges_from_config(config),
      loss_weights=tuple(
        (k, float(v)) for k, v in config.loss.items() if k in _REGULARISERS and v > 0
      ),
      opaque_step=config.loss.opaque_step,
      ray_batch=config.render.ray_batch,
      occupancy=OccupancySpec(
        resolution=config.render.occupancy_grid,
        threshold=config.render.occupancy_threshold,
        decay=config.render.occupancy_decay,
        every=config.render.occupancy_every,
      ),
    )

  def init(self, key, data):
    del data
    return scene.init(key, self.spec)

  def init_aux(self, params, data):
    del params, data
    if not self.occupancy.resolution:
      return {}
    return {"occupancy": occupancy.init(self.occupancy.resolution)}

  def update_aux(self, aux, params, data, step, key):
    del data
    if "occupancy" not in aux:
      return aux
    o = self.occupancy
    density_fn = lambda x: field_lib.density(params["field"], x, self.spec.field)  # noqa: E731
    grid = jax.lax.cond(
      step % o.every == 0,
      lambda g: occupancy.update(g, density_fn, self.spec.render.bound, o.decay, key),
      lambda g: g,
      aux["occupancy"],
    )
    return {"occupancy": grid}

  def sample_camera(self, key):
    return jax.tree.map(lambda v: v[0], cameras.sample(key, self.camera_ranges, 1))

  def render(self, params, data, camera, resolution, key):
    # Ray batches only when the image has more rays than one batch (lax.map of a
    # single batch costs memory for nothing).
    batch = self.ray_batch if 0 < self.ray_batch < resolution * resolution else None
    occupied = None
    if "occupancy" in data.get("aux", {}):
      occupied = occupancy.occupied(data["aux"]["occupancy"], self.occupancy.threshold)
    out = scene.render_camera(
      params, camera.c2w, camera.fovy, resolution, resolution, self.spec, key, batch, occupied
    )
    if occupied is not None:
      out["metrics"] = {"occupied_fraction": occupied.mean()}
    return out

  def regularisers(self, out, step):
    flat = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), out)  # [H W, ...]
    terms = {name: w * _REGULARISERS[name](flat) for name, w in self.loss_weights}
    if "opaque" in terms:
      terms["opaque"] = jnp.where(step >= self.opaque_step, terms["opaque"], 0.0)
    return terms

  def param_labels(self, params):
    labels = jax.tree.map(lambda _: "rest", params)
    labels["field"]["grid"] = jax.tree.map(lambda _: "grid", params["field"]["grid"])
    return labels

  def _occupied(self, data):
    """[n, G, G, G] bool occupancy grids from data['aux'] of the stacked particles, or None."""
    if "occupancy" not in data.get("aux", {}):
      return None
    return jax.vmap(lambda g: occupancy.occupied(g, self.occupancy.threshold))(
      data["aux"]["occupancy"]
    )

  def export(self, particles, data, folder, export_config):
    e = export_config
    occupied = self._occupied(data)
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
        mesh_outlier_faces=e.mesh_outlier_faces,
        occupied=None if occupied is None else occupied[i],
      )

  def evaluate(self, particles, data, references, sigma_ref, export_config, size):
    del sigma_ref
    return evaluate.evaluate_3d(
      particles,
      self.spec,
      references,
      n_views=export_config.eval_views,
      size=size,
      occupied=self._occupied(data),
    )
