"""Each stage's train step compiled for accelerators this machine does not have.

Prints one JSON object per line. The step of each --stages entry is built at
Stable Diffusion 2.1-base's real shapes without weights (models.build_abstract:
every parameter, embedding and state leaf a jax.ShapeDtypeStruct) and compiled
by the target's own compiler for a topology of compile-only devices
(jax.experimental.topologies): TPUs through libtpu (`pip install "jax[tpu]"`),
GPUs through jax's CUDA plugin (`jax[cuda12]`, run with JAX_PLATFORMS=cpu).
The particles x views mesh is training/sharding.py's over the target's chips.

Stages: "1@64" and "1@512" (experiments/vsd.py, NeRF, render 64 or 512),
"2" (experiments/vsd_geometry.py: DMTet normal maps at 512, SDS), "3"
(experiments/vsd_texture.py: texture at 512, VSD), and "sds@512" (experiments/
sds.py: the SDS baseline's NeRF at 512). Stages 2 and 3 start from
runs made here, shaped as real ones: a grid-64 sphere DMTet (the start without
init_from) and, for stage 3, that sphere's mesh textured from a
stage-1 NeRF field, as the official code starts it.

Each row: bench "target", target, topology, stage, representation, mode,
resolution, n_particles, views_per_step, mesh ([particle, view] chips), prior_dtype, phi_base,
level, overrides, jax, xla_flags, compile_s, and per device: memory (the compiler's analysis in
bytes: arguments, outputs, alias, temp, generated_code, shared and total, as
xla_memory.memory), hbm (bytes), fits (compiled and total <= hbm), tflop and
bytes_accessed (XLA's cost analysis of the compiled program, or of the
lowered one where a compile-only GPU has none: `cost`; a gather counts at
least its whole table), flop_s = FLOPs / peak bf16 FLOP/s, byte_s = bytes /
HBM bandwidth and roofline_s, the larger: a lower bound on the step's time
where the byte count is one. A program the compiler refuses gives fits false and its error.

--level sets jax_optimization_level (the compiler's effort; default: its
own). O0 compiles the SD steps for a TPU about 5x faster, with 4 % less temp
memory on the stage-1 512 step; what it costs in step time needs a TPU.

  python benchmarks/targets.py                                   # v5e-1, stages 1-3, n = V = 1
  python benchmarks/targets.py --targets v5e-8,v4-8 --particles 4 --views 1,4
  python benchmarks/targets.py --stages 1@512 --set render.ray_batch=8192
"""

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
from jax.experimental import topologies
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
from train_step import load_config, shared_bytes

from vsdjax import checks
from vsdjax.representations.mesh import dmtet
from vsdjax.representations.nerf import scene
from vsdjax.training import models as models_lib, sharding, train_step
from xla_memory import memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# libtpu locks /tmp/libtpu_lockfile for the one process that may drive a TPU; compiling for
# an absent one needs no exclusive access, so several runs (or a test) can compile at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Target:
  """A chip and topology to compile for, with its published peaks (per chip).

  TPUs: topology and host_bounds as get_topology_desc takes them. GPUs
  (platform "cuda"): one device, and `gpu` the fields of XLA's
  GpuTargetConfigProto's gpu_device_info that differ between the chips.
  """

  topology: str  # get_topology_desc's topology_name
  hbm: float  # bytes of device memory
  bf16_flops: float  # peak dense bfloat16 FLOP/s (T4: float16)
  hbm_bandwidth: float  # bytes/s
  host_bounds: tuple = (1, 1, 1)  # TPU chips_per_host_bounds
  chip_config: str = "default"  # v4: "megacore", its two cores one device (jax's meshes need it)
  platform: str = "tpu"
  gpu: tuple = ()  # (name, sm, SMs, L2 bytes, clock GHz, shared memory per SM, threads per SM)


TARGETS = {
  "v5e-1": Target("v5e:1x1", 16 * 2**30, 197e12, 819e9),  # Colab
  "v5e-8": Target("v5e:2x4", 16 * 2**30, 197e12, 819e9, (2, 4, 1)),  # Kaggle
  "v6e-1": Target("v6e:1x1", 32 * 2**30, 918e12, 1640e9),
  "v4-8": Target("v4:2x2x1", 32 * 2**30, 275e12, 1228e9, (2, 2, 1), "megacore"),
  "h100-80": Target(
    "1x1x1",
    80 * 2**30,
    989e12,
    3.35e12,
    platform="cuda",
    gpu=("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 1.98, 228 * 1024, 2048),
  ),
  "a100-40": Target(
    "1x1x1",
    40 * 2**30,
    312e12,
    1.555e12,
    platform="cuda",
    gpu=("NVIDIA A100-SXM4-40GB", (8, 0), 108, 40 * 2**20, 1.41, 164 * 1024, 2048),
  ),
  "l4-24": Target(
    "1x1x1",
    24 * 2**30,
    121e12,
    300e9,
    platform="cuda",
    gpu=("NVIDIA L4", (8, 9), 58, 48 * 2**20, 2.04, 100 * 1024, 1536),
  ),
  "t4-16": Target(
    "1x1x1",
    16 * 2**30,
    65e12,
    320e9,
    platform="cuda",
    gpu=("Tesla T4", (7, 5), 40, 4 * 2**20, 1.59, 64 * 1024, 1024),
  ),
}
STAGES = {
  "1@64": ("vsd.py", 64),
  "1@512": ("vsd.py", 512),
  "2": ("vsd_geometry.py", 512),
  "3": ("vsd_texture.py", 512),
  "sds@512": ("sds.py", 512),
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", default="v5e-1", help="comma-separated, of " + ", ".join(TARGETS))
  p.add_argument(
    "--stages", default="1@64,1@512,2,3", help="comma-separated, of " + ", ".join(STAGES)
  )
  p.add_argument("--particles", default="1", help="comma-separated n_particles")
  p.add_argument("--views", default="1", help="comma-separated views_per_step")
  p.add_argument(
    "--prior-dtype", default="bfloat16", help="prior.dtype (auto means the CPU's here)"
  )
  p.add_argument(
    "--phi-base", default="prior", help="eps_phi.base: prior (the notebook's) or the config's"
  )
  p.add_argument("--level", default="", help="jax_optimization_level: O0 to O3 ('': default)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = p.parse_args()
  args.targets, args.stages = args.targets.split(","), args.stages.split(",")
  for name, values, known in (
    ("--targets", args.targets, TARGETS),
    ("--stages", args.stages, STAGES),
  ):
    unknown = sorted(set(values) - set(known))
    if unknown:
      p.error(f"{name}: unknown {unknown}, expected some of {list(known)}")
  args.particles = [int(v) for v in args.particles.split(",")]
  args.views = [int(v) for v in args.views.split(",")]
  return args


def gpu_target_config(target: Target) -> str:
  """XLA's GpuTargetConfigProto (text) of a GPU target, from its published figures."""
  name, (major, minor), sms, l2, clock, smem, threads = target.gpu
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem} shared_memory_per_block_optin: {smem - 1024}
  threads_per_core_limit: {threads} core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(target.hbm_bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {int(target.hbm)} registers_per_core_limit: 65536
  registers_per_block_limit: 65536 cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""


def devices(target: Target):
  """Compile-only devices of `target` (GPUs need jax's CUDA plugin, `jax[cuda12]`)."""
  if target.platform == "cuda":
    topo = topologies.get_topology_desc(
      platform="cuda", topology=target.topology, target_config=gpu_target_config(target)
    )
    return topo.devices
  topo = topologies.get_topology_desc(
    topology_name=target.topology,
    platform="tpu",
    chip_config_name=target.chip_config,
    chips_per_host_bounds=target.host_bounds,
    num_slices=1,
    wrap=(False, False, False),
  )
  return topo.devices


def stage_runs(stage: str, n: int) -> tuple:
  """The runs a stage starts from (stages.previous's pairs), made here: () for stages 1 and 2.

  Stage 3: a grid-64 sphere DMTet (vsd_geometry.py without init_from, on the
  whole cube: the fitted box changes no shape) and a stage-1 NeRF whose field
  the texture starts from (zeros of its shapes).
  """
  if stage != "3":
    return ()
  geometry = load_config(os.path.join(_ROOT, "experiments", "vsd_geometry.py"), [])
  geometry.init_from, geometry.n_particles, geometry.mesh.fit_box = "", n, False
  sdf0 = dmtet.DMTet.from_config(geometry).sdf0  # [n, V]
  shapes = {"sdf": sdf0, "deformation": np.zeros(sdf0.shape + (3,), np.float32)}
  nerf = load_config(os.path.join(_ROOT, "experiments", "vsd.py"), [])
  field = jax.eval_shape(
    functools.partial(scene.init, spec=scene.spec_from_config(nerf)), jax.random.PRNGKey(0)
  )
  field = jax.tree.map(lambda a: np.zeros((n,) + a.shape, a.dtype), field)
  return ((geometry, shapes), (nerf, field))


def program_cost(lowered, compiled) -> tuple:
  """(XLA's cost analysis, "compiled" or "lowered"): the compiled program's where the
  target gives one, else the program's before optimisation (compile-only GPUs)."""
  cost = compiled.cost_analysis()
  if cost:
    return cost, "compiled"
  cost = lowered.cost_analysis()
  if not cost:  # jax 0.10's CUDA plugin has none: XLA's analysis on the CPU client.
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

    hlo = lowered.compiler_ir("hlo").as_hlo_module()
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), hlo)
  return cost, "lowered"


def compile_row(args, target_name: str, stage: str, n: int, views: int) -> dict:
  target = TARGETS[target_name]
  path, res = STAGES[stage]
  config = load_config(os.path.join(_ROOT, "experiments", path), args.set)
  config.n_particles, config.views_per_step = n, views
  config.render.resolution = res
  config.prior.dtype = args.prior_dtype
  if config.guidance.mode == "vsd" and args.phi_base == "prior":
    config.eps_phi.base = "prior"
  checks.validate_config(config)
  chips = devices(target)
  p_size, v_size = sharding.mesh_shape(config, len(chips))
  mesh = jax.make_mesh(
    (p_size, v_size),
    (sharding.PARTICLES, sharding.VIEWS),
    (AxisType.Auto,) * 2,
    devices=chips[: p_size * v_size],
  )
  models, frozen = models_lib.build_abstract(config, stage_runs(stage, n))
  frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), frozen)
  init = functools.partial(train_step.init_state, config, models)
  state = jax.eval_shape(init, frozen, jax.random.PRNGKey(0))
  step = train_step.make_train_step(config, models, frozen, res, mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  row = dict(
    bench="target",
    target=target_name,
    topology=target.topology,
    stage=stage,
    representation=config.representation,
    mode=config.guidance.mode,
    resolution=res,
    n_particles=n,
    views_per_step=views,
    mesh=[p_size, v_size],
    prior_dtype=args.prior_dtype,
    phi_base=config.eps_phi.base if config.guidance.mode == "vsd" else None,
    level=args.level or "default",
    overrides=args.set,
    jax=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    hbm=target.hbm,
  )
  start = time.perf_counter()
  try:
    lowered = step.jitted.lower(state, key, frozen)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # The compiler's verdict.
    row.update(compile_s=round(time.perf_counter() - start, 1), fits=False, error=str(e)[:400])
    return row
  row["compile_s"] = round(time.perf_counter() - start, 1)
  mem = memory(compiled, shared_bytes(compiled, frozen, config.eps_phi.base == "prior"))
  cost, source = program_cost(lowered, compiled)
  flops, accessed = cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan"))
  row.update(
    memory=mem,
    fits=mem["total"] <= target.hbm,
    cost=source,
    tflop=round(flops / 1e12, 3),
    bytes_accessed=accessed,
    flop_s=round(flops / target.bf16_flops, 4),
    byte_s=round(accessed / target.hbm_bandwidth, 4),
    roofline_s=round(max(flops / target.bf16_flops, accessed / target.hbm_bandwidth), 4),
  )
  return row


def main():
  args = parse_args()
  if args.level:
    jax.config.update("jax_optimization_level", args.level)
  for target in args.targets:
    for stage in args.stages:
      for n in args.particles:
        for views in args.views:
          print(json.dumps(compile_row(args, target, stage, n, views)), flush=True)


if __name__ == "__main__":
  main()
