"""A tiny toy run on several devices or processes: the sharding tests' subprocess.

  JAX_NUM_CPU_DEVICES=8 python tests/sharded_run.py --workdir DIR --mesh 4x2 --out OUT.npz
  (two processes: add --processes 2 --process_id I --port PORT to each)

Trains tiny_config(--representation) with 4 particles and 2 views per step
on the mesh (`PxV`, or `auto` for the config's default) to each of --steps in
turn (a later one resumes from the checkpoint of the one before, as a rerun
would), with or without the exports (--no-export), then process 0 writes
OUT.npz:
the final state's leaves (`leaf_<i>`, tree order) and, for every particle,
the devices holding it (`particle_devices` [n, devices] bool) and whether
eps_phi is replicated on every device.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--mesh", default="auto")
  parser.add_argument(
    "--steps", default="3", help="comma-separated: train to each in turn (each resumes)"
  )
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--representation", default="nerf")
  parser.add_argument("--no-export", dest="export", action="store_false")
  args = parser.parse_args()

  import jax
  import numpy as np

  from vsdjax import train
  from vsdjax.training import sharding

  if args.processes > 1:
    address = f"127.0.0.1:{args.port}"
    sharding.initialize_distributed(
      coordinator_address=address,
      coordinator_bind_address=address,
      num_processes=args.processes,
      process_id=args.process_id,
      cluster_detection_method="deactivate",
      initialization_timeout=60,
    )
  import helpers  # pylint: disable=import-outside-toplevel

  p_size, v_size = (0, 0) if args.mesh == "auto" else map(int, args.mesh.split("x"))
  if not args.export:
    train.export_all = lambda *args: None
  for steps in map(int, args.steps.split(",")):
    config = helpers.sharded_config(args.representation, steps, p_size, v_size)
    state = train.train_and_evaluate(config, args.workdir, allow_changes=("steps",))
  leaf = jax.tree.leaves(state["particles"])[0]
  column = {d: i for i, d in enumerate(jax.devices())}
  holders = np.zeros((config.n_particles, jax.device_count()), bool)
  for shard in leaf.addressable_shards:
    holders[shard.index[0], column[shard.device]] = True
  holders = sharding.fetch(holders)  # Every process's devices.
  holders = holders.reshape(jax.process_count(), config.n_particles, -1).any(0)
  replicated = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state["phi"]))
  values = sharding.fetch(state)
  if sharding.is_writer():
    leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(values))}
    np.savez(
      args.out,
      particle_devices=holders,
      phi_replicated=replicated,
      devices=jax.device_count(),
      **leaves,
    )


if __name__ == "__main__":
  main()
