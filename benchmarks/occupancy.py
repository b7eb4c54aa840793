"""Empty-space skipping on a trained particle: render speed, samples and error, with and without.

Loads the first particle of a finished NeRF run (--workdir, e.g. a toy.py run),
builds its occupancy grid the way training does (`occupancy.update` from the
field; --updates draws, decay 0.95) and renders the camera of field.py
(distance 1.3, elevation 15, azimuth 30, fovy 50) at each --sizes, forward
and forward + backward (the gradient of a random projection of the image
w.r.t. the field), for:

  plain S:  S stratified samples over each ray's whole [near, far];
  skip S:   S samples over the ray's occupied cells (occupancy.sample_t).

Each line: bench, size, samples, skipping, seconds (median of --repeats after
--warmup), compile_s, memory, rays_per_s, and the samples' use: `hit_rays`
(the fraction of rays with any occupied length; the others still evaluate S
samples in a static-shape program), `spacing` (mean world length between the
samples of a ray, over the hit rays), `occupied_samples` (how many of a hit
ray's S evaluated samples fall in occupied cells, at the bins' centres: the
samples that can see the scene), `occupied_fraction` (of the grid's cells),
and `rmse` of the image against a --reference-samples plain render
(the best estimate of the true image).

  python benchmarks/occupancy.py --workdir workdirs/toy --repeats 3 --warmup 1
  python benchmarks/occupancy.py --workdir workdirs/toy --sizes 512 --benches render_forward
"""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras
from vsdjax.representations.nerf import field as field_lib, occupancy, render, scene
from vsdjax.training import stages
from xla_memory import measure, run_info

_CAMERA = dict(radius=1.3, elevation=15.0, azimuth=30.0, fovy=50.0)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished NeRF run (representation nerf)")
  p.add_argument("--sizes", default="64,512", help="comma-separated square image sizes")
  p.add_argument("--samples", default="32,16", help="comma-separated samples per ray S")
  p.add_argument("--grid", type=int, default=32, help="occupancy grid cells per axis")
  p.add_argument("--updates", type=int, default=8, help="grid updates before rendering")
  p.add_argument("--reference-samples", type=int, default=512, help="0: no reference, no rmse")
  p.add_argument("--ray-batch", type=int, default=32768, help="rays per lax.map batch")
  p.add_argument(
    "--benches", default="render_forward,render_forward_backward", help="comma-separated"
  )
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--max-temp-gib", type=float, default=None)
  return p.parse_args()


def main():
  args = parse_args()
  config, particles = stages.load_run(args.workdir)
  params = jax.tree.map(lambda v: jnp.asarray(v[0]), particles)
  spec = scene.spec_from_config(config)
  bound = spec.render.bound
  ema = occupancy.init(args.grid)
  density_fn = jax.jit(lambda x: field_lib.density(params["field"], x, spec.field))
  for i in range(args.updates):
    ema = occupancy.update(ema, density_fn, bound, 0.95, jax.random.key(i))
  occ = occupancy.occupied(ema, 0.01)
  cam = cameras.from_spherical(**_CAMERA)
  info = run_info(args.repeats)

  def image(p, size, samples, skip, key):
    s = with_samples(spec, samples)
    batch = args.ray_batch if args.ray_batch < size * size else None
    return scene.render_camera(
      p, cam.c2w, cam.fovy, size, size, s, key, batch, occ if skip else None
    )

  for size in (int(s) for s in args.sizes.split(",")):
    ref = None
    if args.reference_samples:
      ref = jax.jit(lambda p, s=size: image(p, s, args.reference_samples, False, None))(params)
    for samples in (int(s) for s in args.samples.split(",")):
      for skip in (False, True):
        row = dict(info, size=size, samples=samples, skipping=skip)
        row.update(sample_use(cam, spec, occ, size, samples, skip))
        if ref is not None:
          out = jax.jit(lambda p, a=(size, samples, skip): image(p, *a, None))(params)
          row["rmse"] = round(float(jnp.sqrt(jnp.mean(jnp.square(out["rgb"] - ref["rgb"])))), 5)
        for bench, fn in benches(image, size, samples, skip):
          if bench not in args.benches.split(","):
            continue
          r = measure(fn, (params,), args.repeats, args.warmup, args.max_temp_gib)
          rays = None if r["seconds"] is None else round(size * size / r["seconds"], 1)
          print(json.dumps(dict(row, bench=bench, rays_per_s=rays, **r)), flush=True)


def benches(image, size, samples, skip):
  """(name, fn(params)) of the forward render and the gradient of a random projection."""
  probe = jax.random.normal(jax.random.key(1), (size, size, 3))

  def loss(p):
    return jnp.sum(image(p, size, samples, skip, jax.random.key(0))["rgb"] * probe)

  return (
    ("render_forward", lambda p: image(p, size, samples, skip, None)["rgb"]),
    ("render_forward_backward", jax.grad(loss)),
  )


def sample_use(cam, spec, occ, size, samples, skip) -> dict:
  """hit_rays, spacing and occupied_fraction (see the module docstring)."""
  origins, directions = cameras.rays(cam.c2w, cam.fovy, size, size)
  o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)  # [R, 3]
  bound = spec.render.bound
  near, far, hit = render.ray_aabb(o, d, bound, spec.render.near_min)
  if skip:
    t, length = occupancy.sample_t(occ, o, d, near, far, bound, samples, 4 * occ.shape[0])
  else:
    t = render.stratified_t(near, far, samples)  # [R, S]
    length = jnp.where(hit, far - near, 0.0)
  world = np.asarray(length * jnp.linalg.norm(d, axis=-1))  # [R]
  used = world > 0
  x = o[:, None, :] + t[..., None] * d[:, None, :]  # [R, S, 3]
  inside = np.asarray(jnp.sum(occupancy.lookup(occ, x, bound), axis=-1))  # [R]
  return {
    "hit_rays": round(float(used.mean()), 4),
    "spacing": round(float(np.mean(world[used]) / samples), 5),
    "occupied_samples": round(float(np.mean(inside[used])), 2),
    "occupied_fraction": round(float(jnp.mean(occ)), 4),
  }


def with_samples(spec, samples):
  """spec with `samples` samples per ray (scan chunks of at most 16)."""
  r = dataclasses.replace(spec.render, n_samples=samples, chunk=min(16, samples))
  return dataclasses.replace(spec, render=r)


if __name__ == "__main__":
  main()
