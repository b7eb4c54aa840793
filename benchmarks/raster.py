"""Speed and memory of the mesh rasterizer (stages 2 and 3) under jit.

Prints one JSON object per line, for each image size of --sizes and each
mesh of --faces: a geodesic sphere (icosahedron faces split into k^2
triangles, k = round(sqrt(faces / 20)), so 20 k^2 faces) of radius 0.5 with
smooth random bumps of +-15%, seen from the camera of field.py (distance 1.3,
elevation 15, azimuth 30, fovy 50), with per-vertex random colours:

  raster_visibility: `project` + `rasterize` (default levels) (renders/s);
  raster_forward: the same + `barycentrics` + `interpolate` of the colours
    over a grey background + `antialias` (renders/s);
  raster_forward_backward: the value and the (vertex position, colour)
    gradient of a random projection of the antialiased image (renders/s).

Each line has bench, size, value, unit, device, backend, jax, repeats, and:
seconds (median of --repeats timed runs after --warmup untimed ones),
compile_s, memory (xla_memory.py), faces, coverage (fraction of pixels on the
mesh), overflow / dropped / fill (`Raster`'s counts: tiles over their
candidate limit, candidates dropped, the fullest tile per level), levels and
large. A program whose compiled temp exceeds --max-temp-gib is compiled but
not run (value null, `skipped`).

  python benchmarks/raster.py --repeats 2 --warmup 0     # CPU
  python benchmarks/raster.py                            # GPU
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras
from vsdjax.representations.mesh import raster
from xla_memory import measure, run_info

_CAMERA = dict(radius=1.3, elevation=15.0, azimuth=30.0, fovy=50.0)
_RADIUS = 0.5
_BUMP = 0.15


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="512", help="comma-separated square image sizes")
  p.add_argument(
    "--faces", default="10000,100000,300000", help="comma-separated approximate face counts"
  )
  p.add_argument("--repeats", type=int, default=5, help="timed runs per program")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs per program after compiling")
  p.add_argument("--cull-back", action="store_true", help="rasterize with cull_back=True")
  p.add_argument(
    "--max-temp-gib",
    type=float,
    default=None,
    help="compile but do not run programs whose XLA temp memory exceeds this",
  )
  args = p.parse_args()
  args.sizes = [int(s) for s in args.sizes.split(",")]
  args.faces = [int(s) for s in args.faces.split(",")]
  if args.repeats < 1 or min(args.sizes) < 1 or min(args.faces) < 20:
    p.error("--repeats and --sizes must be positive, --faces at least 20")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  return args


def geodesic_sphere(k: int):
  """Unit sphere: each icosahedron face split into k^2 triangles, outward.

  Returns verts [10 k^2 + 2, 3] float64 and faces [20 k^2, 3] int32.
  """
  g = (1.0 + math.sqrt(5.0)) / 2.0
  ico_v = np.array(
    [[-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0], [0, -1, g], [0, 1, g],
     [0, -1, -g], [0, 1, -g], [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1]],
  )  # fmt: skip
  ico_f = np.array(
    [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
     [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
     [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]],
  )  # fmt: skip
  # Lattice points (i, j), i + j <= k, of one face and its triangles.
  i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
  keep = i + j <= k
  i, j = i[keep], j[keep]  # [P]
  index = np.full((k + 1, k + 1), -1)
  index[i, j] = np.arange(len(i))
  a, b = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  up, down = a + b <= k - 1, a + b <= k - 2
  local = np.concatenate(
    [
      np.stack([index[a[up], b[up]], index[a[up] + 1, b[up]], index[a[up], b[up] + 1]], -1),
      np.stack(
        [index[a[down] + 1, b[down]], index[a[down] + 1, b[down] + 1], index[a[down], b[down] + 1]],
        -1,
      ),
    ]
  )  # [k^2, 3]
  c0, c1, c2 = (ico_v[ico_f[:, n]] for n in range(3))  # [20, 3]
  pts = c0[:, None] + (c1 - c0)[:, None] * (i / k)[:, None] + (c2 - c0)[:, None] * (j / k)[:, None]
  pts = (pts / np.linalg.norm(pts, axis=-1, keepdims=True)).reshape(-1, 3)  # [20 P, 3]
  faces = (local[None] + len(i) * np.arange(20)[:, None, None]).reshape(-1, 3)
  # Points on the icosahedron's edges appear once per face: merge them.
  _, first, inverse = np.unique(
    np.round(pts * 1e6).astype(np.int64), axis=0, return_index=True, return_inverse=True
  )
  verts, faces = pts[first], inverse.reshape(-1)[faces]
  normal = np.cross(
    verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]
  )
  inward = np.einsum("fk,fk->f", normal, verts[faces].mean(1)) < 0
  return verts, np.where(inward[:, None], faces[:, ::-1], faces).astype(np.int32)


def bumpy_sphere(n_faces: int, rng):
  """geodesic_sphere of about n_faces faces, radius _RADIUS +- _BUMP bumps."""
  verts, faces = geodesic_sphere(max(1, round(math.sqrt(n_faces / 20))))
  waves = 3.0 * rng.normal(size=(8, 3))
  phase = rng.uniform(0, 2 * math.pi, 8)
  scale = 1.0 + _BUMP * np.mean(np.sin(verts @ waves.T + phase), axis=-1, keepdims=True)
  return (_RADIUS * scale * verts).astype(np.float32), faces


def programs(size: int, cull_back: bool, cotangent):
  """(visibility, forward, forward_backward) of (verts, colors, faces, mask, c2w, fovy).

  The faces and their mask are arguments, as in stage 2 where they change at
  every step (as constants, XLA would fold the edge table at compile time).
  """

  def visibility(verts, colors, faces, mask, c2w, fovy):
    del colors
    clip = raster.project(verts, c2w, fovy)
    return raster.rasterize(clip, faces, mask, size, size, cull_back=cull_back)

  def forward(verts, colors, faces, mask, c2w, fovy):
    clip = raster.project(verts, c2w, fovy)
    r = raster.rasterize(clip, faces, mask, size, size, cull_back=cull_back)
    bary = raster.barycentrics(clip, faces, r.tri_id, size, size)
    image = raster.interpolate(colors, faces, r.tri_id, bary)
    image = image + 0.5 * (r.tri_id < 0)[..., None]  # [H, W, 3] over grey
    return raster.antialias(image, clip, faces, mask, r.tri_id), r

  def forward_backward(verts, colors, faces, mask, c2w, fovy):
    loss = lambda v, c: jnp.vdot(forward(v, c, faces, mask, c2w, fovy)[0], cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(verts, colors)

  return visibility, forward, forward_backward


def main():
  args = parse_args()
  base = run_info(args.repeats)
  cam = cameras.from_spherical(**_CAMERA)
  rng = np.random.default_rng(0)
  for size in args.sizes:
    cotangent = rng.normal(size=(size, size, 3)).astype(np.float32)
    for n_faces in args.faces:
      verts, faces = bumpy_sphere(n_faces, rng)
      colors = rng.uniform(size=verts.shape).astype(np.float32)
      mask = np.ones(len(faces), bool)
      visibility, forward, forward_backward = programs(size, args.cull_back, cotangent)
      fn_args = (verts, colors, faces, mask, cam.c2w, cam.fovy)
      stats = None
      for name, fn in (
        ("raster_visibility", visibility),
        ("raster_forward", forward),
        ("raster_forward_backward", forward_backward),
      ):
        result = measure(fn, fn_args, args.repeats, args.warmup, args.max_temp_gib)
        if stats is None:  # After timing the compile (a later jit hits its cache).
          r = jax.jit(visibility)(*fn_args)
          stats = dict(
            faces=len(faces),
            coverage=round(float(jnp.mean(r.tri_id >= 0)), 4),
            overflow=int(r.overflow),
            dropped=int(r.dropped),
            fill=np.asarray(r.fill).tolist(),
            levels=raster.DEFAULT_LEVELS,
            large=raster.DEFAULT_LARGE,
            cull_back=args.cull_back,
          )
        seconds = result.pop("seconds")
        row = dict(
          bench=name,
          size=f"{size}x{size}",
          value=None if seconds is None else round(1.0 / seconds, 3),
          unit="renders/s",
          **base,
          seconds=None if seconds is None else round(seconds, 5),
          **stats,
          **result,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
