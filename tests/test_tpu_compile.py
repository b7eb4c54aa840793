"""The toy step compiled by the TPU compiler for a Colab v5e-1, without a TPU.

libtpu (the `test` extra's `jax[tpu]`) compiles for a topology of compile-only
devices; its memory analysis is the TPU's (benchmarks/targets.py does the same
at Stable Diffusion's shapes). Skipped where libtpu is not installed.
"""

import functools
import importlib.util

import jax
from jax.experimental import topologies
import jax.numpy as jnp
from jax.sharding import AxisType
import pytest

from experiments import toy
from vsdjax import checks
from vsdjax.training import models, sharding, train_step

# The toy step's total on v5e:1x1 is 0.14 GiB (arguments, outputs, temp, code); with the hash
# grid's corners and features on the minor axes (padded to 128 lanes) it is 1.15 GiB.
BUDGET = 2**29

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install 'jax[tpu]')",
)


def test_toy_step_compiles_for_a_v5e_within_budget(monkeypatch):
  # libtpu takes a lock file that a second process on this machine (another test worker,
  # a benchmark) would hold; compiling for an absent TPU needs no exclusive access.
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(
    topology_name="v5e:1x1",
    platform="tpu",
    chip_config_name="default",
    chips_per_host_bounds=(1, 1, 1),
    num_slices=1,
    wrap=(False, False, False),
  )
  config = toy.get_config()
  checks.validate_config(config)
  mesh = jax.make_mesh(
    (1, 1), (sharding.PARTICLES, sharding.VIEWS), (AxisType.Auto,) * 2, devices=topology.devices
  )
  m, frozen = models.build(config, jax.random.PRNGKey(0))
  frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), frozen)
  init = functools.partial(train_step.init_state, config, m)
  state = jax.eval_shape(init, frozen, jax.random.PRNGKey(1))
  step = train_step.make_train_step(config, m, frozen, config.render.resolution, mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  compiled = step.jitted.lower(state, key, frozen).compile()
  assert compiled.input_shardings[0][0]["step"].device_set <= set(topology.devices)
  mem = compiled.memory_analysis()
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  assert 0 < total <= BUDGET, f"{total / 2**30:.2f} GiB on v5e:1x1"
