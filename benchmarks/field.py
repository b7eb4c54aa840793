"""Speed and memory of the scene side: hash-grid encoding and volume rendering.

Prints one JSON object per line:

  hashgrid_encode_forward / hashgrid_encode_forward_backward: `hashgrid.encode`
    of --points uniform points with the default GridSpec (16 levels of 2^19
    rows, 2 features), and the value and table gradient of a random
    projection of the features (points/s);
  render_forward / render_forward_backward: `scene.render_camera` of the
    default SceneSpec (64 samples per ray, lax.scan over chunks of 16,
    view-direction background MLP) at each of --sizes, jittered samples, and
    the value and field-params gradient of a random projection of the image
    plus the mean opacity, as in a training step (rays/s).

Each line has bench, size, value, unit, device, backend, and: seconds (median
of --repeats timed runs after --warmup untimed ones), compile_s, and
memory, XLA's compiled memory analysis in bytes (xla_memory.py: arguments,
outputs, alias, temp, generated_code, total). Where the device reports it (GPUs, TPUs), memory also
has the device's peak_bytes_in_use, a process-wide peak: programs run in
order of increasing size, so each line's peak is dominated by its own
program. A program whose compiled temp exceeds --max-temp-gib is compiled but
not run; its line has value null and the reason in `skipped`. Render lines
also give samples_per_ray and ray_batch.

  python benchmarks/field.py                      # GPU: the real sizes
  python benchmarks/field.py --quick              # CPU: 512x512 forward only
  python benchmarks/field.py --benches render --sizes 512 --ray-batch 32768 \
      --repeats 1 --warmup 0                      # CPU: 512x512 in batches
"""

import argparse
import json

import jax
import jax.numpy as jnp

from vsdjax import cameras
from vsdjax.representations.nerf import hashgrid, scene
from xla_memory import measure

# The benchmark camera: outside the scene cube, looking at the blob at the origin.
_CAMERA = dict(radius=1.3, elevation=15.0, azimuth=30.0, fovy=50.0)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--benches", default="hashgrid,render", help="comma-separated, of hashgrid, render"
  )
  p.add_argument("--points", type=int, default=2**18, help="points per hash-grid encode")
  p.add_argument("--sizes", default="64,512", help="comma-separated square render sizes")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per program")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs per program after compiling")
  p.add_argument(
    "--ray-batch", type=int, default=None, help="render in batches of this many rays (lax.map)"
  )
  p.add_argument(
    "--max-temp-gib",
    type=float,
    default=None,
    help="compile but do not run programs whose XLA temp memory exceeds this",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="one timed run each; skip render forward+backward at sizes above 128 (CPU)",
  )
  args = p.parse_args()
  args.sizes = [int(s) for s in args.sizes.split(",")]
  args.benches = args.benches.split(",")
  unknown = sorted(set(args.benches) - {"hashgrid", "render"})
  if unknown:
    p.error(f"unknown --benches {unknown}")
  if args.points < 1 or args.repeats < 1 or min(args.sizes) < 1:
    p.error("--points, --repeats and --sizes must be positive")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  if args.ray_batch is not None and args.ray_batch < 1:
    p.error("--ray-batch must be positive")
  if args.quick:
    args.repeats = 1
  return args


def emit(base: dict, bench: str, size, count: int, unit: str, result: dict, **extra) -> None:
  """Prints one line: throughput count / seconds in `unit`."""
  seconds = result.pop("seconds")
  value = None if seconds is None else round(count / seconds, 1)
  row = dict(
    bench=bench,
    size=size,
    value=value,
    unit=unit,
    **base,
    seconds=None if seconds is None else round(seconds, 5),
    **extra,
    **result,
  )
  print(json.dumps(row), flush=True)


def bench_hashgrid(args, base: dict) -> None:
  spec = hashgrid.GridSpec()
  k_init, k_x, k_g = jax.random.split(jax.random.PRNGKey(0), 3)
  params = hashgrid.init(k_init, spec)
  x = jax.random.uniform(k_x, (args.points, 3))  # [N, 3]
  cotangent = jax.random.normal(k_g, (args.points, spec.n_output))  # [N, L F]

  def forward(params, x):
    return hashgrid.encode(params, x, spec)  # [N, L F]

  def forward_backward(params, x, cotangent):
    # <encode, cotangent> and its table gradient: one VJP, as in training.
    return jax.value_and_grad(lambda p: jnp.vdot(forward(p, x), cotangent))(params)

  for bench, fn, fn_args in (
    ("hashgrid_encode_forward", forward, (params, x)),
    ("hashgrid_encode_forward_backward", forward_backward, (params, x, cotangent)),
  ):
    result = measure(fn, fn_args, args.repeats, args.warmup, args.max_temp_gib)
    emit(
      base,
      bench,
      args.points,
      args.points,
      "points/s",
      result,
      levels=spec.n_levels,
      log2_table_size=spec.log2_table_size,
    )


def render_programs(spec: scene.SceneSpec, size: int, ray_batch):
  """(forward, forward_backward) of one size x size render of `spec`."""

  def forward(params, c2w, fovy, key):
    out = scene.render_camera(params, c2w, fovy, size, size, spec, key, ray_batch)
    return out["rgb"], out["opacity"]  # [H, W, 3], [H, W]

  def forward_backward(field_params, params, c2w, fovy, key, cotangent):
    # <rgb, cotangent> + mean opacity (an image-space guidance gradient and a
    # sparsity-like regulariser, as in a train step) and its field gradient.
    def loss(field_params):
      rgb, opacity = forward(dict(params, field=field_params), c2w, fovy, key)
      return jnp.vdot(rgb, cotangent) + jnp.mean(opacity)

    return jax.value_and_grad(loss)(field_params)

  return forward, forward_backward


def bench_render(args, base: dict) -> None:
  spec = scene.SceneSpec()
  k_init, k_render, k_g = jax.random.split(jax.random.PRNGKey(0), 3)
  params = scene.init(k_init, spec)
  cam = cameras.from_spherical(**_CAMERA)
  for size in sorted(args.sizes):
    forward, forward_backward = render_programs(spec, size, args.ray_batch)
    cotangent = jax.random.normal(k_g, (size, size, 3))  # [H, W, 3]
    programs = [("render_forward", forward, (params, cam.c2w, cam.fovy, k_render))]
    if not (args.quick and size > 128):
      programs.append(
        (
          "render_forward_backward",
          forward_backward,
          (params["field"], params, cam.c2w, cam.fovy, k_render, cotangent),
        )
      )
    for bench, fn, fn_args in programs:
      result = measure(fn, fn_args, args.repeats, args.warmup, args.max_temp_gib)
      emit(
        base,
        bench,
        f"{size}x{size}",
        size * size,
        "rays/s",
        result,
        samples_per_ray=spec.render.n_samples,
        ray_batch=args.ray_batch,
      )


def main():
  args = parse_args()
  base = {
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "repeats": args.repeats,
  }
  if "hashgrid" in args.benches:
    bench_hashgrid(args, base)
  if "render" in args.benches:
    bench_render(args, base)


if __name__ == "__main__":
  main()
