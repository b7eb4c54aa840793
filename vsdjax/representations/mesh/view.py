"""Seeing a triangle mesh from a camera: visibility, barycentrics, antialiased images.

`draw` rasterizes a mesh (raster.py), interpolates per-vertex attributes at
the pixel centres and returns what the representations composite. `finish`
antialiases a composited image (colour and coverage together), so the
silhouette gradients reach the vertex positions through both.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vsdjax.representations.mesh import raster


class View(NamedTuple):
  """A rasterized mesh (one camera).

  Attributes:
    clip: [V, 4] clip-space vertices (differentiable).
    tri_id: [H, W] int32 visible face, -1 for background.
    bary: [H, W, 3] perspective-correct barycentrics (differentiable).
    mask: [H, W] float 1 where a face is seen.
    overflow: [] int32 tiles that dropped candidate faces (raster.Raster).
  """

  clip: jax.Array
  tri_id: jax.Array
  bary: jax.Array
  mask: jax.Array
  overflow: jax.Array


def draw(verts, faces, face_mask, c2w, fovy, size: int) -> View:
  """Rasterizes verts [V, 3], faces [F, 3] (face_mask [F]) into a size x size view."""
  clip = raster.project(verts, c2w, fovy)  # [V, 4]
  r = raster.rasterize(jax.lax.stop_gradient(clip), faces, face_mask, size, size)
  bary = raster.barycentrics(clip, faces, r.tri_id, size, size)  # [H, W, 3]
  mask = (r.tri_id >= 0).astype(clip.dtype)
  return View(clip, r.tri_id, bary, mask, r.overflow)


def attribute(view: View, attr, faces) -> jax.Array:
  """Per-vertex attr [V, C] at the pixel centres: [H, W, C] (zeros on background)."""
  return raster.interpolate(attr, faces, view.tri_id, view.bary)


def finish(view: View, rgb, faces, face_mask, antialias: bool = True) -> tuple:
  """(rgb [H, W, 3], opacity [H, W]): the composited rgb and the mask, antialiased together.

  antialias False: as sampled at the pixel centres (how the analytic
  references and the volume renders are sampled; the evaluations compare so).
  """
  if not antialias:
    return rgb, view.mask
  rgba = jnp.concatenate([rgb, view.mask[..., None]], axis=-1)  # [H, W, 4]
  out = raster.antialias(rgba, view.clip, faces, face_mask, view.tri_id)
  return out[..., :3], out[..., 3]
