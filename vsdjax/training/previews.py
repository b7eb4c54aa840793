"""Preview renders while training: every particle from a few fixed cameras, one PNG grid.

Every `preview_every` steps (the exports show the end) the trainer writes
DIR/previews/<step, 6 digits>.png: row i is particle i; the columns are the
representation's preview cameras (`preview_cameras`: VIEWS on the exports'
orbit, or the 2D experiment's one camera), once for each channel its render
has, in the order of CHANNELS:

  rgb       the render the prior sees (a DMTet's is its normal map)
  normal    (n + 1) / 2 of the rendered normals (a NeRF that computes them)
  opacity   grey

Renders are deterministic (key None: no random background) at the first
training size `render.resolution`, at most MAX_SIZE, and take the state as
the train step leaves it: one jit (compiled once) maps over the cameras and
vmaps over the particles, so it follows the particles' sharding and renders
n images at a time, as the step does; the small images are then gathered to
every process.

Cost on cpu-2, experiments/toy.py (one NeRF particle, 4 views of 32x32 at 16
samples per ray), timed alternating with its train step under a load of ~4.5
on the two cores: 0.69 s a preview (3.6 s the first, with its compile)
against 0.42 s a step, so preview_every = 100 adds ~1.7% to a run. vmapping
over the particle axis doubles the render on the CPU (batched hash-table
gathers; 0.32 s one particle at a time) but keeps it where the particles'
shards are. toy2d.py (8 image particles): 2 ms a preview, 0.25 s a step.
"""

import os
from typing import Callable

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import grid
from vsdjax.representations import Representation
from vsdjax.representations.nerf import export
from vsdjax.training import sharding

# Preview cameras of a 3D representation, and the render entries shown, in column order.
VIEWS = 4
CHANNELS = ("rgb", "normal", "opacity")
# Largest preview render (stages 2-3 train at 512: their previews render at this size).
MAX_SIZE = 128


def due(config, step: int) -> bool:
  """Whether the trainer writes a preview after `step` steps (preview_every 0: never)."""
  return config.preview_every > 0 and step % config.preview_every == 0


def make_render(
  representation: Representation, size: int, n_views: int = VIEWS, cams=None
) -> Callable:
  """render(particles, data) -> {channel: [n, V, size, size, 3] in [0, 1]} (device arrays).

  `particles` are stacked [n, ...]; `data` is {'shared': ..., 'particle':
  [n, ...], 'aux': [n, ...]} as in Representation.export. Channels are those
  of CHANNELS that the render returns, as colours (see the module docstring).
  `cams` (Cameras [V]) replaces the representation's n_views preview cameras.
  """
  cams = representation.preview_cameras(n_views) if cams is None else cams  # [V]

  def one(params, own, aux, shared, cam):
    data = {"shared": shared, "particle": own, "aux": aux}
    out = representation.render(params, data, cam, size, None)
    images = {}
    for name in CHANNELS:
      if name in out:
        x = out[name]
        if name == "normal":
          x = 0.5 * (x + 1.0)
        if x.ndim == 2:  # [H, W] -> grey [H, W, 3]
          x = jnp.repeat(x[..., None], 3, axis=-1)
        images[name] = x
    return images

  @jax.jit
  def render(particles, data):
    every_particle = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # [n, ...]
    per_camera = jax.lax.map(
      lambda cam: every_particle(
        particles, data["particle"], data.get("aux", {}), data["shared"], cam
      ),
      cams,
    )  # {channel: [V, n, H, W, 3]}
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), per_camera)

  return render


def to_grid(images: dict) -> np.ndarray:
  """{channel: [n, V, H, W, 3]} -> the preview image (grid.tile of [n, C V] tiles) in [0, 1]."""
  tiles = np.concatenate([np.asarray(images[c]) for c in CHANNELS if c in images], axis=1)
  return grid.tile(np.nan_to_num(tiles.astype(np.float32)))


def make(config, models, frozen) -> Callable:
  """preview(state) -> the preview image [rows, cols, 3] of a train state, in every process.

  `preview.render` is the jitted render (make_render).
  """
  render = make_render(models.representation, min(config.render.resolution, MAX_SIZE))

  def preview(state):
    data = dict(frozen["representation"], aux=state.get("aux", {}))
    return to_grid(sharding.fetch(render(state["particles"], data)))  # Every process gathers.

  preview.render = render
  return preview


def path(workdir: str, step: int) -> str:
  """DIR/previews/<step, 6 digits>.png."""
  return os.path.join(workdir, "previews", f"{step:06d}.png")


def save(workdir: str, step: int, image: np.ndarray) -> None:
  """Writes DIR/previews/<step>.png atomically (process 0 only); image [H, W, 3] in [0, 1]."""
  if not sharding.is_writer():
    return
  target = path(workdir, step)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  iio.imwrite(target + ".tmp", export.to_uint8(image), extension=".png")
  os.replace(target + ".tmp", target)
