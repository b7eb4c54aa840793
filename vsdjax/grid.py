"""Image grids: a table of equal-size images as one image (previews, contact sheets)."""

import numpy as np

# Pixels between the tiles of a grid, and their grey.
PAD = 2
PAD_VALUE = 0.5


def tile(images: np.ndarray, pad: int = PAD, pad_value: float = PAD_VALUE) -> np.ndarray:
  """[R, C, H, W, 3] images -> one [R H + (R - 1) pad, C W + (C - 1) pad, 3] image.

  Tile (r, c) starts at row r (H + pad) and column c (W + pad); the gaps are
  pad_value.
  """
  images = np.asarray(images)
  if images.ndim != 5 or images.shape[-1] != 3:
    raise ValueError(f"images must be [rows, cols, H, W, 3], got {images.shape}")
  rows, cols, h, w, _ = images.shape
  out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), pad_value, images.dtype)
  for r in range(rows):
    for c in range(cols):
      out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[r, c]
  return out
