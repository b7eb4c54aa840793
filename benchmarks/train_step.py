"""Speed and memory of the jitted SDS / VSD train step (train_step.py).

Prints one JSON object per line.

Toy part (default): the config of --config (experiments/toy.py: analytic
prior, tiny eps_phi UNet, small hash grid) for each --modes x --particles;
models.build, train_step.init_state, make_train_step, then
`train_step.jitted.lower(state, key, frozen).compile()`. Each line: bench
"toy_step", mode, n_particles, resolution, value = median seconds per step
(--repeats timed steps after --warmup steps; the state is donated and carried
from step to step), per_particle_s, compile_s, tflop (the lowered
program's, see compile_step) and memory.

SD part (--sd, alone): the Stable Diffusion 2.1-base architecture from the
shipped configs with NO weights (models.build_abstract): the UNet / VAE
params, the text embeddings ([4, 77, 1024] per view and [77, 1024]
unconditional) and the state (jax.eval_shape of init_state) are
jax.ShapeDtypeStruct trees, so the VSD step of the --sd-config
(experiments/vsd.py) is lowered and compiled without allocating anything.
For each --sd-resolutions (render size; the step resizes the render to 512
before the VAE, so the latents are 64x64 at every size) x --sd-dtypes (the
prior's; eps_phi's base keeps float32 unless it is the shared prior) x
--phi-bases ("prior": eps_phi is LoRA on the prior's own
UNet, or "stable-diffusion-2-1": a separate SD 2.1 (768, v) UNet, float32,
as ProlificDreamer): bench "sd_step", compile_s, tflop, memory, and the bytes of
the state and frozen arrays. With --time (meant for a GPU) the step also runs
on random weights and value is its median seconds.

memory is XLA's compiled memory analysis in bytes: arguments, outputs, alias
(donated state buffers reused by outputs), temp, generated_code, and total =
arguments + outputs - alias + temp + generated_code, the device memory the
step needs. With the shared "prior" base the UNet params are two arguments of
the jitted step (frozen['prior'].unet_params and frozen['phi_base']) but one
buffer at run time: `shared` holds their bytes, subtracted once from total,
unless the program reads only one of them (eps_phi.batch_with_prior: every
UNet call takes frozen['phi_base']) and XLA drops the other from the arguments.

--profile STEPS traces STEPS more steps after the timed ones and adds
`profile` to the row: the costliest XLA operations and parts of the step
(xla_profile.py).

--set FIELD=VALUE overrides a field of the loaded config (either part), e.g.
render.chunk=4 for smaller render scan steps; lines list them in `overrides`.

  python benchmarks/train_step.py                           # toy, n = 1, 2, 4, 8
  python benchmarks/train_step.py --sd                      # compile only
  python benchmarks/train_step.py --sd --sd-resolutions 512 --set render.chunk=4
  python benchmarks/train_step.py --sd --time --sd-particles 1,2   # GPU
  python benchmarks/train_step.py --sd --time --sd-resolutions 512 --profile 2   # GPU
"""

import argparse
import ast
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import xla_profile

from random_weights import random_like
from vsdjax import checks
from vsdjax.training import models as models_lib, train_step
from xla_memory import memory, run_info

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DTYPES = ("float32", "bfloat16")
_PHI_BASES = ("prior", "stable-diffusion-2-1")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--config",
    default=os.path.join(_ROOT, "experiments", "toy.py"),
    help="toy part: experiment config file",
  )
  p.add_argument("--modes", default="vsd,sds", help="comma-separated guidance modes")
  p.add_argument(
    "--particles", default="1,2,4,8", help="comma-separated particle counts (toy part)"
  )
  p.add_argument(
    "--resolution", type=int, default=None, help="toy part: render size (default: the config's)"
  )
  p.add_argument("--repeats", type=int, default=5, help="timed steps")
  p.add_argument(
    "--profile",
    type=int,
    default=0,
    metavar="STEPS",
    help="after the timed steps, trace STEPS more and report the costliest "
    "operations and parts of the step (xla_profile.py; SD part: with --time)",
  )
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--sd", action="store_true", help="run the Stable Diffusion part only")
  p.add_argument(
    "--sd-config",
    default=os.path.join(_ROOT, "experiments", "vsd.py"),
    help="SD part: experiment config file",
  )
  p.add_argument("--sd-resolutions", default="64,512", help="SD part: comma-separated render sizes")
  p.add_argument(
    "--sd-dtypes",
    default="float32,bfloat16",
    help="SD part: prior dtypes, of " + ", ".join(_DTYPES),
  )
  p.add_argument(
    "--phi-bases",
    default="prior,stable-diffusion-2-1",
    help="SD part: eps_phi bases, of " + ", ".join(_PHI_BASES),
  )
  p.add_argument("--sd-particles", default="1", help="SD part: comma-separated particle counts")
  p.add_argument(
    "--time", action="store_true", help="SD part: also run the step on random weights (GPU)"
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field of either part, e.g. "
    "render.chunk=4 (repeatable; VALUE is a Python literal "
    "or a string)",
  )
  args = p.parse_args()
  ints = lambda s: [int(v) for v in s.split(",")]
  args.modes = args.modes.split(",")
  args.particles = ints(args.particles)
  args.sd_resolutions = ints(args.sd_resolutions)
  args.sd_particles = ints(args.sd_particles)
  args.sd_dtypes = args.sd_dtypes.split(",")
  args.phi_bases = args.phi_bases.split(",")
  for name, values, allowed in (
    ("--modes", args.modes, ("vsd", "sds")),
    ("--sd-dtypes", args.sd_dtypes, _DTYPES),
    ("--phi-bases", args.phi_bases, _PHI_BASES),
  ):
    unknown = sorted(set(values) - set(allowed))
    if unknown:
      p.error(f"{name}: unknown {unknown}, expected some of {list(allowed)}")
  for item in args.set:
    if "=" not in item:
      p.error(f"--set {item!r}: expected FIELD=VALUE")
  if (
    min(args.particles + args.sd_particles + args.sd_resolutions) < 1
    or args.repeats < 1
    or args.warmup < 0
    or args.profile < 0
    or (args.resolution is not None and args.resolution < 1)
  ):
    p.error("particle counts, resolutions and --repeats must be positive")
  return args


def load_config(path: str, overrides):
  """get_config() of an experiment file, with FIELD=VALUE overrides applied."""
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  if spec is None:
    raise ValueError(f"config file {path!r} cannot be imported")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    field, text = item.split("=", 1)
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if name not in node:
      raise ValueError(f"--set {item!r}: the config has no field {field!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[name] = value
  return config


def nbytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in jax.tree.leaves(tree))


def shared_bytes(compiled, frozen: dict, shared: bool) -> int:
  """Bytes of the UNet params that are two arguments of the step but one buffer at run time.

  With eps_phi on the prior's own UNet (`shared`), frozen['prior'] and
  frozen['phi_base'] hold the same params; 0 when not shared, or when the
  program reads only one copy and XLA dropped the other from its arguments.
  """
  if not shared:
    return 0
  both = nbytes(frozen["phi_base"])
  return (
    0 if compiled.memory_analysis().argument_size_in_bytes < nbytes(frozen) - both / 2 else both
  )


def compile_step(step, state, key, frozen):
  """(compiled step, seconds to lower and compile, TFLOP of the lowered program).

  The FLOPs are XLA's cost analysis before backend passes, the same on every
  backend (the compiled program's analysis on a GPU leaves out library calls).
  """
  start = time.perf_counter()
  lowered = step.jitted.lower(state, key, frozen)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  tflop = lowered.cost_analysis().get("flops", float("nan")) / 1e12
  return compiled, seconds, round(tflop, 4)


def time_steps(compiled, state, key, frozen, repeats: int, warmup: int, profile_steps: int = 0):
  """(median seconds of a step, the profile of `profile_steps` more steps or None).

  The donated state goes from step to step.
  """
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, key, frozen)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  if not profile_steps:
    return statistics.median(times), None

  def step():
    nonlocal state
    state, metrics = compiled(state, key, frozen)
    jax.block_until_ready((state, metrics))

  return statistics.median(times), xla_profile.profile(compiled, step, profile_steps)


def bench_toy(args, base: dict) -> None:
  key = jax.random.PRNGKey(0)
  for mode in args.modes:
    for n in args.particles:
      config = load_config(args.config, args.set)
      config.guidance.mode = mode
      config.n_particles = n
      if args.resolution is not None:
        config.render.resolution = config.render.resolution_after = args.resolution
        config.prior.reference_size = args.resolution
      res = config.render.resolution
      checks.validate_config(config)
      models, frozen = models_lib.build(config, key)
      state = train_step.init_state(config, models, frozen, key)
      step = train_step.make_train_step(config, models, frozen, res)
      compiled, compile_s, tflop = compile_step(step, state, key, frozen)
      seconds, profile = time_steps(
        compiled, state, key, frozen, args.repeats, args.warmup, args.profile
      )
      row = dict(
        bench="toy_step",
        size=f"n={n}",
        value=round(seconds, 5),
        unit="s/step",
        **base,
        mode=mode,
        n_particles=n,
        resolution=res,
        overrides=args.set,
        per_particle_s=round(seconds / n, 5),
        compile_s=round(compile_s, 2),
        tflop=tflop,
        memory=memory(compiled),
      )
      if profile:
        row["profile"] = profile
      print(json.dumps(row), flush=True)


def sd_models(config, phi_base: str) -> tuple:
  """(models.Models, abstract frozen) of the shipped SD configs (models.build_abstract)."""
  config.eps_phi.base = phi_base
  checks.validate_config(config)
  return models_lib.build_abstract(config)


def materialize(frozen: dict, shared: bool, seed: int) -> dict:
  """Random weights and embeddings for an abstract frozen (the schedule and the
  representation's data stay)."""
  sd = frozen["prior"]["sd"]
  sd = dataclasses.replace(
    sd,
    unet_params=random_like(sd.unet_params, seed),
    vae_params=random_like(sd.vae_params, seed + 1),
  )
  prior = {k: v for k, v in frozen["prior"].items() if k != "sd"}
  phi_base = sd.unet_params if shared else random_like(frozen["phi_base"], seed + 2)
  return dict(
    frozen,  # The representation's data: real arrays already (build_abstract).
    prior=dict(random_like(prior, seed + 3), sd=sd),
    phi_base=phi_base,
    phi_emb=random_like(frozen["phi_emb"], seed + 4),
  )


def bench_sd(args, base: dict) -> None:
  key = jax.random.PRNGKey(0)
  for res in args.sd_resolutions:
    for dtype_name in args.sd_dtypes:
      for phi_base in args.phi_bases:
        for n in args.sd_particles:
          config = load_config(args.sd_config, args.set)  # its guidance mode (stage 2: SDS)
          config.prior.dtype = dtype_name
          config.n_particles = n
          config.render.resolution = res
          models, frozen = sd_models(config, phi_base)
          init = functools.partial(train_step.init_state, config, models)
          state = jax.eval_shape(init, frozen, key)
          step = train_step.make_train_step(config, models, frozen, res)
          compiled, compile_s, tflop = compile_step(step, state, key, frozen)
          shared = shared_bytes(compiled, frozen, phi_base == "prior")
          sd = frozen["prior"]["sd"]
          row = dict(
            bench="sd_step",
            representation=config.representation,
            size=f"{res}x{res}",
            value=None,
            unit="s/step",
            **base,
            mode=config.guidance.mode,
            n_particles=n,
            resolution=res,
            latent=models.prior.model.unet.sample_size,
            prior_dtype=dtype_name,
            phi_base=phi_base,
            overrides=args.set,
            compile_s=round(compile_s, 2),
            tflop=tflop,
            memory=memory(compiled, shared),
            state_bytes={k: nbytes(v) for k, v in state.items()},
            frozen_bytes={
              "prior_unet": nbytes(sd.unet_params),
              "prior_vae": nbytes(sd.vae_params),
              "phi_base": nbytes(frozen["phi_base"]),
              "embeddings": nbytes(
                [frozen["prior"]["emb_cond"], frozen["prior"]["emb_uncond"], frozen["phi_emb"]]
              ),
            },
          )
          if args.time:
            real_frozen = materialize(frozen, phi_base == "prior", 0)
            real_state = jax.jit(init)(real_frozen, key)
            seconds, profile = time_steps(
              compiled, real_state, key, real_frozen, args.repeats, args.warmup, args.profile
            )
            row["value"] = round(seconds, 5)
            row["per_particle_s"] = round(seconds / n, 5)
            row["memory"] = memory(compiled, shared)  # With the device peak.
            if profile:
              row["profile"] = profile
            del real_frozen, real_state
          print(json.dumps(row), flush=True)


def main():
  args = parse_args()
  base = run_info(args.repeats)
  if args.sd:
    bench_sd(args, base)
  else:
    bench_toy(args, base)


if __name__ == "__main__":
  main()
