"""Speed and memory of DMTet's marching tetrahedra (stage 2 geometry) under jit.

Prints one JSON object per line, for each grid resolution N of --resolutions
(Kuhn grid of [-1, 1]^3: (N + 1)^3 vertices, 6 N^3 tets) and a sphere of
radius 0.6 (sdf = |x| - 0.6 plus a small random perturbation, random
deformations):

  marching_tets_forward: `deform` then `marching_tets` with
    max_faces = `default_max_faces` (64 N^2), the grid's arrays passed as
    arguments (tets/s);
  marching_tets_forward_backward: the value and the (sdf, deformation)
    gradient of a random projection of the valid faces' corner positions, as
    a rasterizer's cotangent would reach them (tets/s);
  marching_tets_regularised_forward_backward: the same plus 1e4 x (normal
    consistency + Laplacian smoothness), the stage-2 regularisers (tets/s).

Each line has bench, size (N), value, unit, device, backend, jax, repeats,
and: seconds (median of --repeats timed runs after --warmup untimed ones),
compile_s, memory (xla_memory.py), tets, edges, max_faces, n_faces (the
sphere's), grid_s (host seconds of `kuhn_grid`). A program whose compiled
temp exceeds --max-temp-gib is compiled but not run (value null, `skipped`).

  python benchmarks/marching_tets.py --resolutions 64          # CPU
  python benchmarks/marching_tets.py                           # GPU: 64 and 128
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax.representations.mesh import geometry, marching_tets as mt, tetgrid
from xla_memory import measure, run_info

_RADIUS = 0.6


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--resolutions", default="64,128", help="comma-separated grid resolutions N")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per program")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs per program after compiling")
  p.add_argument(
    "--max-temp-gib",
    type=float,
    default=None,
    help="compile but do not run programs whose XLA temp memory exceeds this",
  )
  args = p.parse_args()
  args.resolutions = [int(s) for s in args.resolutions.split(",")]
  if args.repeats < 1 or min(args.resolutions) < 1:
    p.error("--repeats and --resolutions must be positive")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  return args


def programs(template, max_faces: int, cotangent):
  """(forward, forward_backward, regularised_forward_backward) of (arrays, sdf, deformation).

  `arrays` are the grid's arrays (jit arguments, as DMTet passes them); its
  resolution and box stay static, from `template`.
  """

  def forward(arrays, sdf, deformation):
    grid = template._replace(**arrays)
    return mt.marching_tets(grid, sdf, mt.deform(grid, deformation), max_faces)

  def corners(mesh):  # [M, 3, 3] valid faces' corner positions, 0 elsewhere
    return jnp.where(mesh.face_mask[:, None, None], mesh.verts[mesh.faces], 0.0)

  def forward_backward(grid, sdf, deformation):
    loss = lambda s, d: jnp.vdot(corners(forward(grid, s, d)), cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(sdf, deformation)

  def regularised_forward_backward(grid, sdf, deformation):
    def loss(s, d):
      mesh = forward(grid, s, d)
      regularisers = geometry.normal_consistency(
        mesh.verts, mesh.faces, mesh.face_mask
      ) + geometry.laplacian_smoothness(mesh.verts, mesh.faces, mesh.face_mask)
      return jnp.vdot(corners(mesh), cotangent) + 1e4 * regularisers

    return jax.value_and_grad(loss, argnums=(0, 1))(sdf, deformation)

  return forward, forward_backward, regularised_forward_backward


def bench(args, base: dict, n: int) -> None:
  start = time.perf_counter()
  grid = tetgrid.kuhn_grid(n, 1.0)
  grid_s = round(time.perf_counter() - start, 2)
  max_faces = mt.default_max_faces(grid)
  rng = np.random.default_rng(0)
  noise = rng.uniform(-0.1, 0.1, len(grid.verts)) * grid.cell_size[0]
  sdf = (np.linalg.norm(grid.verts, axis=1) - _RADIUS + noise).astype(np.float32)  # [V]
  deformation = (0.1 * rng.normal(size=grid.verts.shape)).astype(np.float32)  # [V, 3]
  cotangent = rng.normal(size=(max_faces, 3, 3)).astype(np.float32)  # [M, 3, 3]
  forward, forward_backward, regularised = programs(grid, max_faces, cotangent)
  arrays = {k: getattr(grid, k) for k in ("verts", "tets", "edges", "tet_edges")}
  fn_args = (arrays, sdf, deformation)
  n_faces = None
  for name, fn in (
    ("marching_tets_forward", forward),
    ("marching_tets_forward_backward", forward_backward),
    ("marching_tets_regularised_forward_backward", regularised),
  ):
    result = measure(fn, fn_args, args.repeats, args.warmup, args.max_temp_gib)
    if n_faces is None:  # After timing the forward's compile (a later jit hits its cache).
      n_faces = int(jax.jit(forward)(*fn_args).n_faces)
    seconds = result.pop("seconds")
    row = dict(
      bench=name,
      size=n,
      value=None if seconds is None else round(len(grid.tets) / seconds, 1),
      unit="tets/s",
      **base,
      seconds=None if seconds is None else round(seconds, 5),
      tets=len(grid.tets),
      edges=len(grid.edges),
      max_faces=max_faces,
      n_faces=n_faces,
      grid_s=grid_s,
      **result,
    )
    print(json.dumps(row), flush=True)


def main():
  args = parse_args()
  base = run_info(args.repeats)
  for n in args.resolutions:
    bench(args, base, n)


if __name__ == "__main__":
  main()
