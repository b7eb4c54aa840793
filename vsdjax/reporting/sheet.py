"""A contact sheet of a run's exports: the PNG views under DIR/final/ as one labelled PNG.

Row i is DIR/final/particle_<i>/; its tiles are the views that export wrote,
in name order (numbers compared as numbers):

  views/view_XX.png   NeRF (stage 1)
  normals_<k>.png     DMTet (stage 2)
  view_<k>.png        textured mesh (stage 3)
  image.png           an image particle (the 2D experiment)

(texture.png, a UV atlas, is not a view). Tiles are shrunk by box averaging
to at most TILE pixels a side. With DIR/final/eval.json the rows are labelled
with each particle's nearest reference and its PSNR to it.
"""

import json
import math
import os
import re

import imageio.v3 as iio
from matplotlib.figure import Figure
import numpy as np

from vsdjax import grid

# Largest tile side (pixels) of the sheet.
TILE = 128
# Per-particle PNGs that are not views.
NOT_VIEWS = ("texture.png",)


def _natural(name: str) -> list:
  """Sort key: 'view_10' after 'view_9'."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def particle_views(final: str) -> list:
  """[[view paths of particle 0], [... of particle 1], ...] under final/particle_<i>/."""
  folders = sorted((d for d in os.listdir(final) if re.fullmatch(r"particle_\d+", d)), key=_natural)
  views = []
  for d in folders:
    folder = os.path.join(final, d)
    if os.path.isdir(os.path.join(folder, "views")):
      folder = os.path.join(folder, "views")
    names = [n for n in os.listdir(folder) if n.endswith(".png") and n not in NOT_VIEWS]
    views.append([os.path.join(folder, n) for n in sorted(names, key=_natural)])
  return views


def _shrink(image: np.ndarray, tile: int) -> np.ndarray:
  """[H, W, 3] -> box-averaged by the smallest integer factor that fits `tile`."""
  f = math.ceil(max(image.shape[:2]) / tile)
  if f == 1:
    return image
  h, w = image.shape[0] // f * f, image.shape[1] // f * f
  return image[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))


def _labels(final: str, n: int) -> list:
  """A row label per particle, from eval.json where it names the nearest reference."""
  labels = [f"particle {i}" for i in range(n)]
  path = os.path.join(final, "eval.json")
  if not os.path.exists(path):
    return labels
  with open(path) as f:
    result = json.load(f)
  if "particles" in result:  # NeRF, textured mesh, 2D: held-out PSNR to the nearest.
    for i, p in enumerate(result["particles"][:n]):
      labels[i] += f"\n{p['nearest']} {p['psnr']:.1f} dB"
  elif "nearest" in result and "normal_psnr" in result:  # DMTet: normal-map PSNR.
    for i, (name, psnr) in enumerate(zip(result["nearest"][:n], result["normal_psnr"])):
      labels[i] += f"\n{name} {max(psnr):.1f} dB normals"
  return labels


def contact_sheet(final: str, path: str) -> bool:
  """Writes the contact sheet of final/ to `path`; False (nothing written) without views."""
  views = particle_views(final) if os.path.isdir(final) else []
  if not any(views):
    return False
  tiles = [[_shrink(iio.imread(v)[..., :3] / 255.0, TILE) for v in row] for row in views]
  h = max(t.shape[0] for row in tiles for t in row)
  w = max(t.shape[1] for row in tiles for t in row)
  cols = max(len(row) for row in tiles)
  table = np.full((len(tiles), cols, h, w, 3), grid.PAD_VALUE)
  for r, row in enumerate(tiles):
    for c, t in enumerate(row):
      table[r, c, : t.shape[0], : t.shape[1]] = t
  image = grid.tile(table)  # [R (h + pad) - pad, C (w + pad) - pad, 3]
  fig = Figure(
    figsize=(image.shape[1] / 100 + 1.6, image.shape[0] / 100 + 0.5), layout="constrained"
  )
  ax = fig.subplots()
  ax.imshow(image, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([r * (h + grid.PAD) + h / 2 for r in range(len(tiles))], _labels(final, len(tiles)))
  ax.tick_params(length=0, labelsize="small")
  ax.set_title(os.path.abspath(final), fontsize="small")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  return True
