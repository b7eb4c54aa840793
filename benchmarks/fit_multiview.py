"""Proof of the scene side: fit a NeRF to exact multi-view renders of a shape.

Renders `--views` training views and `--heldout` other views of a procedural
reference shape (shapes.py, sphere tracing: ground truth independent of the
NeRF renderer), fits the field + background with a photometric loss on random
ray batches, then renders the held-out cameras with the volume renderer and
reports their PSNR. Held-out renders are saved next to their references as
PNGs in `--out`. The last line printed is one JSON object.

  python benchmarks/fit_multiview.py            # ~ a few minutes on a 2-core CPU
"""

import argparse
import json
import os
import time

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vsdjax import cameras
from vsdjax.prior.analytic import shapes
from vsdjax.representations.nerf import background, field, hashgrid, render, scene


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="torus:#d08030", help="reference, shape:#rrggbb")
  p.add_argument("--views", type=int, default=40, help="training views")
  p.add_argument(
    "--bound",
    type=float,
    default=0.6,
    help="half-size of the scene cube; the shapes fit in radius 0.5, and a "
    "cube that excludes the cameras leaves no room for floaters",
  )
  p.add_argument("--heldout", type=int, default=8, help="held-out views")
  p.add_argument("--size", type=int, default=64, help="image size (square)")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--rays", type=int, default=1024, help="rays per step")
  p.add_argument("--samples", type=int, default=32, help="samples per ray")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="out/fit_multiview", help="folder for PNGs")
  return p.parse_args()


def psnr(a, b):
  return float(-10.0 * np.log10(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def main():
  args = parse_args()
  refs = shapes.parse_references(args.shape)
  key = jax.random.PRNGKey(args.seed)
  k_train, k_held, k_init, k_loop = jax.random.split(key, 4)
  ranges = cameras.CameraRanges()
  size = args.size

  def views(k, n):
    cams = cameras.sample(k, ranges, n)
    imgs = shapes.render_views(refs[0], cams.c2w, cams.fovy, size, size)["rgb"]
    o, d = jax.vmap(lambda m, f: cameras.rays(m, f, size, size))(cams.c2w, cams.fovy)
    return cams, imgs, o, d  # imgs / o / d: [n, H, W, 3]

  _, train_rgb, train_o, train_d = views(k_train, args.views)
  held_cams, held_rgb, _, _ = views(k_held, args.heldout)
  train_rgb, train_o, train_d = (v.reshape(-1, 3) for v in (train_rgb, train_o, train_d))

  spec = scene.SceneSpec(
    field=field.FieldSpec(grid=hashgrid.GridSpec(n_levels=8, log2_table_size=16), bound=args.bound),
    render=render.RenderSpec(n_samples=args.samples, chunk=16, bound=args.bound),
    background="mlp",
  )
  params = scene.init(k_init, spec)
  labels = jax.tree.map(lambda _: "mlp", params)
  labels["field"]["grid"] = jax.tree.map(lambda _: "grid", params["field"]["grid"])
  opt = optax.multi_transform(
    {
      "grid": optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-15),
      "mlp": optax.adam(3e-3, b1=0.9, b2=0.99, eps=1e-15),
    },
    labels,
  )
  opt_state = opt.init(params)

  def loss_fn(params, idx, key):
    point_fn = field.point_fn(params["field"], spec.field)
    d = train_d[idx]  # [R, 3]
    bg = background.color(params["background"], d)  # [R, 3]
    out = render.render(point_fn, train_o[idx], d, bg, spec.render, key)
    return jnp.mean((out["rgb"] - train_rgb[idx]) ** 2)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_render = jax.random.split(key)
    idx = jax.random.randint(k_idx, (args.rays,), 0, train_rgb.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, idx, k_render)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.time()
  for i in range(args.steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_loop, i))
    if i % 250 == 0 or i == args.steps - 1:
      print(
        json.dumps(
          {
            "step": i,
            "loss": float(loss),
            "psnr_train_batch": -10 * float(np.log10(loss)),
            "seconds": round(time.time() - t0, 1),
          }
        ),
        flush=True,
      )
  seconds = time.time() - t0

  render_view = jax.jit(lambda p, m, f: scene.render_camera(p, m, f, size, size, spec)["rgb"])
  os.makedirs(args.out, exist_ok=True)
  scores = []
  for i in range(args.heldout):
    pred = np.clip(np.asarray(render_view(params, held_cams.c2w[i], held_cams.fovy[i])), 0, 1)
    ref = np.asarray(held_rgb[i])
    scores.append(psnr(pred, ref))
    side = np.concatenate([ref, pred], axis=1)  # reference | NeRF
    iio.imwrite(
      os.path.join(args.out, f"heldout_{i:02d}.png"), (side * 255).round().astype(np.uint8)
    )
  print(
    json.dumps(
      {
        "psnr_heldout": round(float(np.mean(scores)), 2),
        "psnr_heldout_min": round(float(np.min(scores)), 2),
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "views": args.views,
        "size": size,
        "shape": args.shape,
        "device": str(jax.devices()[0].device_kind),
        "out": args.out,
      }
    )
  )


if __name__ == "__main__":
  main()
