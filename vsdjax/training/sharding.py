"""Where a run's arrays live: a device mesh of particles x views, and multi-host runs.

The mesh has two axes (config `sharding`):
  'particles'  each particle, its optimiser state and its occupancy grid live on
               one slice of this axis (state leaves [n, ...] sharded on axis 0)
  'views'      the views_per_step renders of one particle are split over it

eps_phi, its optimiser state, the step counter, the keys and the frozen models
are replicated; the compiler turns the replicated eps_phi's gradient (and a
particle's gradient summed over its views) into all-reduces. The train step is
the same program on one device and on many: only the jit's shardings and one
sharding constraint on the per-view keys depend on the mesh.

Multi-host runs (TPU pod slices, several GPU nodes) start one process per host
with `python -m vsdjax.main --distributed ...` (jax.distributed.initialize();
the cluster is detected from the environment). Every process builds the same
models, takes part in every step, checkpoint save and restore; metrics, configs
and exports are written by process 0 only (`is_writer`).
"""

import math
import os

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from vsdjax import checks, console

PARTICLES, VIEWS = "particles", "views"
# Leaves of the train state with a leading particle axis (train_step.init_state).
PARTICLE_STATE = ("particles", "particle_opt", "aux")


def initialize_distributed(**kwargs) -> None:
  """jax.distributed.initialize(**kwargs), once, before anything touches a device.

  JAX_NUM_PROCESSES and JAX_PROCESS_ID, when set, give num_processes and
  process_id (jax reads JAX_COORDINATOR_ADDRESS itself); on clusters that jax
  detects (Cloud TPU, SLURM, Open MPI, Kubernetes) none is needed.
  """
  for name, field in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(name):
      kwargs.setdefault(field, int(os.environ[name]))
  jax.distributed.initialize(**kwargs)
  console.say(
    f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
    f"of {jax.device_count()} devices"
  )


def is_writer() -> bool:
  """Whether this process writes files (metrics, configs, exports): process 0."""
  return jax.process_index() == 0


def mesh_shape(config, n_devices: int) -> tuple:
  """(particle devices, view devices) for `config` on `n_devices` devices.

  sharding.particles / sharding.views of 0 choose: as many particle devices as
  divide n_particles (gcd), then as many view devices as divide views_per_step
  among the rest. Devices left over stay idle (said by make_mesh); sizes that do
  not divide the particle or view count are a ConfigError.
  """
  n, v = config.n_particles, config.views_per_step
  p_size = config.sharding.particles or math.gcd(n, n_devices)
  v_size = config.sharding.views or math.gcd(v, n_devices // p_size or 1)
  if n % p_size:
    raise checks.ConfigError(
      f"config field sharding.particles={p_size} does not divide n_particles={n}: each device "
      "holds the same number of particles (use a divisor of n_particles, or 0 to choose)"
    )
  if v % v_size:
    raise checks.ConfigError(
      f"config field sharding.views={v_size} does not divide views_per_step={v} (use a "
      "divisor, or 0 to choose)"
    )
  if p_size * v_size > n_devices:
    raise checks.ConfigError(
      f"config fields sharding.particles={p_size} x sharding.views={v_size} need "
      f"{p_size * v_size} devices; {n_devices} are visible"
    )
  return p_size, v_size


def make_mesh(config) -> jax.sharding.Mesh:
  """The particles x views mesh of `config` over this run's devices (all processes)."""
  devices = jax.devices()
  p_size, v_size = mesh_shape(config, len(devices))
  used = p_size * v_size
  if used < len(devices):
    if jax.process_count() > 1:
      raise checks.ConfigError(
        f"a multi-process run must use all {len(devices)} devices; n_particles="
        f"{config.n_particles} and views_per_step={config.views_per_step} fill {used} "
        "(make n_particles x views_per_step a multiple of the device count)"
      )
    console.say(
      f"using {used} of {len(devices)} devices ({p_size} for particles x {v_size} for views): "
      f"n_particles={config.n_particles} and views_per_step={config.views_per_step} fill no "
      "more (make their product a multiple of the device count to use all)"
    )
  return jax.make_mesh(
    (p_size, v_size), (PARTICLES, VIEWS), (AxisType.Auto,) * 2, devices=devices[:used]
  )


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def by_render(mesh) -> NamedSharding:
  """Sharding of per-render arrays [n V, ...] (view j of particle i at i V + j)."""
  return NamedSharding(mesh, P((PARTICLES, VIEWS)))


def state_shardings(mesh, state) -> dict:
  """A sharding per leaf of the train state (arrays or ShapeDtypeStructs)."""

  def part(name, tree):
    s = NamedSharding(mesh, P(PARTICLES)) if name in PARTICLE_STATE else replicated(mesh)
    return jax.tree.map(lambda _: s, tree)

  return {k: part(k, v) for k, v in state.items()}


def frozen_shardings(mesh, frozen) -> dict:
  """A sharding per leaf of models.build's frozen data: per-particle data split, rest replicated."""
  by_particle = NamedSharding(mesh, P(PARTICLES))
  shardings = jax.tree.map(lambda _: replicated(mesh), frozen)
  shardings["representation"]["particle"] = jax.tree.map(
    lambda _: by_particle, frozen["representation"]["particle"]
  )
  return shardings


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (orbax restores onto them)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def put(tree, shardings):
  """`tree` (the same values in every process) as global arrays with `shardings`.

  Arrays already placed so are returned as they are (a no-op for the train
  state between steps), and so are ShapeDtypeStructs (a step traced or
  compiled without weights: models.build_abstract).
  """

  def one(x, s):
    if isinstance(x, jax.ShapeDtypeStruct) or (isinstance(x, jax.Array) and x.sharding == s):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def fetch(tree):
  """Host numpy copies of (possibly sharded, multi-process) arrays, in every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
