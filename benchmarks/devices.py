"""Train-step time against the device count: the particles x views mesh (training/sharding.py).

Prints one JSON object per line. For each --devices count d, a subprocess
with d devices (JAX_NUM_CPU_DEVICES on the CPU; on a GPU / TPU machine the
first d accelerators, through --platform) builds the --config (experiments/
toy.py) with --particles and --views, the mesh of `sharding.make_mesh`
(sharding.* = 0: chosen), and times the jitted train step: bench "devices",
devices, mesh ([particle, view] devices), n_particles, views_per_step,
compile_s, value (median seconds per step over --repeats after --warmup),
renders_per_s, and `efficiency` = t(1) / (d t(d)), the fraction of perfect
scaling (filled in for d > 1 when d = 1 ran first).

Host CPU "devices" share the machine's cores, so on the CPU this measures the
mesh's overhead (collectives, partitioning) at a fixed amount of work, not a
speed-up: efficiency near 1/d there means no overhead.

  python benchmarks/devices.py                          # 1, 2, 4, 8 host devices
  python benchmarks/devices.py --platform gpu --devices 1,2,4,8
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/toy.py")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--platform", default="cpu", help="cpu (host devices), gpu or tpu")
  p.add_argument("--particles", type=int, default=8)
  p.add_argument("--views", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  return p.parse_args()


def child(args):
  """Runs in the subprocess: times the step on args.child devices; prints one line."""
  import jax  # pylint: disable=import-outside-toplevel

  from vsdjax.training import (  # pylint: disable=import-outside-toplevel
    models,
    sharding,
    train_step,
  )
  from xla_memory import run_info  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.n_particles, config.views_per_step = args.particles, args.views
  if args.platform != "cpu":  # The first d accelerators.
    config.sharding.particles, config.sharding.views = sharding.mesh_shape(config, args.child)
  mesh = sharding.make_mesh(config)
  m, frozen = models.build(config, jax.random.PRNGKey(0))
  state = train_step.init_state(config, m, frozen, jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(2)
  start = time.perf_counter()
  step = train_step.make_train_step(config, m, frozen, config.render.resolution, mesh)
  state, metrics = step(state, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, metrics = step(state, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, metrics = step(state, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  renders = config.n_particles * config.views_per_step
  print(
    json.dumps(
      {
        "bench": "devices",
        **run_info(args.repeats),
        "devices": args.child,
        "mesh": list(mesh.devices.shape),
        "n_particles": config.n_particles,
        "views_per_step": config.views_per_step,
        "resolution": config.render.resolution,
        "compile_s": round(compile_s, 2),
        "value": round(seconds, 4),
        "renders_per_s": round(renders / seconds, 2),
      }
    ),
    flush=True,
  )


def main():
  args = parse_args()
  if args.child:
    child(args)
    return
  base = None
  for d in (int(x) for x in args.devices.split(",")):
    env = dict(os.environ, JAX_PLATFORMS=args.platform)
    if args.platform == "cpu":
      env["JAX_NUM_CPU_DEVICES"] = str(d)
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", str(d)]
    out = subprocess.run(
      command, env=env, cwd=os.getcwd(), capture_output=True, text=True, check=False
    )
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
      print(json.dumps({"bench": "devices", "devices": d, "error": out.stderr[-2000:]}))
      continue
    row = json.loads(lines[-1])
    if d == 1:
      base = row["value"]
    elif base is not None:
      row["efficiency"] = round(base / (d * row["value"]), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
