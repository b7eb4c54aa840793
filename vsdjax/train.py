"""The trainer: config -> models -> jitted steps -> metrics, checkpoints, exports.

Importable from notebooks:

  from vsdjax import train
  from experiments import toy
  state = train.train_and_evaluate(toy.get_config(), "workdirs/toy")

Work directory:
  DIR/config.json      the resolved config (config.resume-<time>.json per resume)
  DIR/metrics.jsonl    one JSON object per logged step
  DIR/checkpoints/     orbax checkpoints (atomic); a rerun resumes from the latest
                       that restores (training/workdir.py)
  DIR/previews/        every particle from fixed cameras, every preview_every steps
                       (training/previews.py)
  DIR/events.out.tfevents.*  TensorBoard: the metrics, previews, config (training/summaries.py)
  DIR/final/           exports (particle_<i>/...) and, for the analytic prior, eval.json
"""

import contextlib
import json
import math
import os
import signal
import threading
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import jaxlib.version
import orbax.checkpoint as ocp
import tqdm

from vsdjax import checks, console
from vsdjax.prior.analytic import evaluate
from vsdjax.representations.nerf import hashgrid
from vsdjax.training import (
  models as models_lib,
  previews,
  sharding,
  stages,
  summaries,
  train_step,
  workdir as workdir_lib,
)


class NonFiniteLossError(checks.UserError, FloatingPointError):
  """A metric of the train step was NaN or infinite, or the guidance had such entries."""


class TrainingInterrupted(checks.UserError):
  """SIGINT or SIGTERM stopped training after saving the current step."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


def resolution_at(config, step: int) -> int:
  """Render size of step `step` (the 64 -> 512 schedule; one compilation each)."""
  r = config.render
  return r.resolution if step < r.resolution_step else r.resolution_after


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops metric lines after `last_step` (written by a run that was killed)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(lines)


@jax.jit
def _healthy(metrics: dict) -> jax.Array:
  """[] bool: every metric finite and no non-finite guidance entry (one cheap fetch)."""
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
  return finite & (metrics.get("guidance_nonfinite", 0) == 0)


def _nonfinite_error(metrics: dict, step: int, last_checkpoint, workdir: str):
  parts = [f"{k}={v}" for k, v in sorted(metrics.items()) if not math.isfinite(v)]
  if metrics.get("guidance_nonfinite", 0):
    parts.append(
      f"guidance_nonfinite={metrics['guidance_nonfinite']:g} (NaN or infinite "
      "entries of the noise predictions)"
    )
  where = (
    f"the last good checkpoint is step {last_checkpoint} in {workdir}/checkpoints"
    if last_checkpoint is not None
    else "no checkpoint was written"
  )
  return NonFiniteLossError(
    f"step {step}: non-finite {'; '.join(parts)}; stopped, nothing of this step saved; {where}"
  )


@contextlib.contextmanager
def _stop_on_signals():
  """Yields a dict whose 'signum' is set by SIGINT / SIGTERM (a second one acts as usual)."""
  caught = {"signum": None}
  if threading.current_thread() is not threading.main_thread():
    yield caught  # Signals reach only the main thread's handlers.
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

  def handler(signum, frame):
    del frame
    caught["signum"] = signum
    for s, h in previous.items():
      signal.signal(s, h)
    console.say(
      f"{signal.Signals(signum).name}: saving a checkpoint after this step "
      "(send it again to stop at once)"
    )

  for s in previous:
    signal.signal(s, handler)
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


# Compiles shorter than this are not cached: eager ops take milliseconds, train
# steps seconds (the 2D toy's on cpu-2) to minutes (Stable Diffusion).
CACHE_MIN_COMPILE_SECONDS = 0.5


def use_compile_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path` for the rest of the process.

  Compiles of CACHE_MIN_COMPILE_SECONDS or more are written there and read
  back by any later process that compiles the same program with the same jax
  and device. "" leaves JAX's own settings (JAX_COMPILATION_CACHE_DIR); a
  folder that cannot be created turns the cache off with a message.
  """
  if not path:
    return
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    console.say(f"compile_cache {path} cannot be created ({e.strerror}); compiling without it")
    return
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()  # JAX opens its cache folder once per process.
    jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # Any size.


def train_and_evaluate(config, workdir: str, allow_changes=()) -> dict:
  """Trains (resuming from the latest checkpoint), then exports; returns the state.

  The config is validated and, when `workdir` holds a run, checked against it
  before anything is written (workdir.check_resume; `allow_changes` names
  fields that may differ from it). SIGINT / SIGTERM save the current step and
  raise TrainingInterrupted; the same call resumes from it.
  """
  stages.inherit(config)
  checks.validate_config(config)
  resumed = workdir_lib.check_resume(config, workdir, tuple(allow_changes))
  if config.mode == "export" and not resumed:
    raise checks.UserError(f"mode=export: no checkpoint in {workdir_lib.checkpoint_dir(workdir)}")
  mesh = sharding.make_mesh(config)
  if sharding.is_writer():
    workdir_lib.record_config(config, workdir, resumed)
  sharding.barrier("record_config")
  use_compile_cache(config.compile_cache)
  if config.representation != "image":  # Every 3D representation has a hash grid.
    warning = hashgrid.slow_scatter_warning(
      jax.default_backend(), jaxlib.version.__version__, os.environ.get("XLA_FLAGS", "")
    )
    if warning and sharding.is_writer():
      console.say(warning)
  key = jax.random.PRNGKey(config.seed)
  k_models, k_init, k_steps = jax.random.split(key, 3)
  models, frozen = models_lib.build(config, k_models)
  frozen = sharding.put(frozen, sharding.frozen_shardings(mesh, frozen))
  init = lambda f: train_step.init_state(config, models, f, k_init)
  shapes = jax.eval_shape(init, frozen)
  state_sh = sharding.state_shardings(mesh, shapes)
  init = jax.jit(init, out_shardings=state_sh)
  state, mngr = workdir_lib.restore(config, workdir, sharding.abstract(shapes, state_sh))
  if state is None:
    state = init(frozen)
  else:
    console.say(f"resuming the run in {workdir} from step {int(state['step'])}")
  if config.mode == "export":
    export_all(config, models, frozen, state, workdir)
    return state
  k_steps = sharding.put(k_steps, sharding.replicated(mesh))
  state = _train(config, workdir, models, frozen, state, mngr, k_steps, mesh)
  export_all(config, models, frozen, state, workdir)
  return state


def _train(config, workdir, models, frozen, state, mngr, key, mesh) -> dict:
  """The loop: steps, metrics.jsonl, checkpoints, the non-finite and signal stops."""
  start = int(state["step"])
  writer = sharding.is_writer()  # Every process steps and saves; process 0 writes the rest.
  metrics_path = os.path.join(workdir, "metrics.jsonl") if writer else os.devnull
  if writer:
    _truncate_metrics(metrics_path, start)
  steps, bar, saved = {}, None, start
  t0 = time.time()
  preview = previews.make(config, models, frozen)
  with (
    open(metrics_path, "a") as log,
    _stop_on_signals() as stop,
    summaries.Writer(config, workdir, start) as board,
  ):
    try:
      for step in range(start, config.steps):
        res = resolution_at(config, step)
        compiling = res not in steps
        if compiling:  # A new bar after the compile, so its ETA leaves the compile out.
          bar = bar.close() if bar is not None else None
          console.say(
            f"compiling the train step for {res}x{res} renders (minutes for Stable Diffusion) ..."
          )
          steps[res] = train_step.make_train_step(config, models, frozen, res, mesh)
          t_compile = time.time()
        state, metrics = steps[res](state, key)
        done = step + 1
        if not bool(_healthy(metrics)):
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          raise _nonfinite_error(metrics, done, mngr.latest_step(), workdir)
        if compiling:
          console.say(f"step {done} (compile and run) took {time.time() - t_compile:.1f} s")
          bar = tqdm.tqdm(
            total=config.steps,
            initial=done,
            desc="vsdjax",
            unit="step",
            dynamic_ncols=True,
            disable=not writer,
          )
        else:
          bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
          metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
          bar.set_postfix(loss=f"{metrics['loss']:.4g}", res=res)
          record = {"step": done, **metrics, "resolution": res}
          record["seconds"] = round(time.time() - t0, 3)
          log.write(json.dumps(record) + "\n")
          log.flush()
          board.scalars(record)
          for name in sorted(k for k, v in metrics.items() if k.endswith("_overflow") and v > 0):
            # A fixed budget (faces, tile candidates) was exceeded: the render dropped faces.
            console.say(
              f"warning: step {done}: {name} = {metrics[name]:.3g} (a static budget was "
              "exceeded and faces were dropped; see the config's mesh section)"
            )
        if previews.due(config, done):
          image = preview(state)  # In every process: the particles may be sharded.
          previews.save(workdir, done, image)
          board.image("previews", done, image)
        if (
          done % config.checkpoint_every == 0 or done == config.steps or stop["signum"] is not None
        ):
          mngr.save(done, args=ocp.args.StandardSave(state))
          mngr.wait_until_finished()
          saved = done
        if stop["signum"] is not None:
          name = signal.Signals(stop["signum"]).name
          raise TrainingInterrupted(
            f"{name} at step {done}: saved checkpoint {saved} in "
            f"{workdir_lib.checkpoint_dir(workdir)}; the same command resumes from it",
            stop["signum"],
          )
    finally:
      if bar is not None:
        bar.close()
  return state


def export_all(config, models, frozen, state, workdir: str) -> None:
  """Writes DIR/final/: per-particle exports and, where the prior knows the answer, eval.json."""
  final = os.path.join(workdir, "final")
  particles, aux, rep_data = sharding.fetch(
    (state["particles"], state.get("aux", {}), frozen["representation"])
  )  # Every process takes part in the gather; process 0 writes.
  if sharding.is_writer():
    data = dict(rep_data, aux=aux)
    models.representation.export(particles, data, final, config.export)
    result = models.prior.evaluate(models.representation, particles, data, config)
    if result is not None:
      evaluate.write_json(result, os.path.join(final, "eval.json"))
  sharding.barrier("export")


# Fields a chained stage takes from the first stage's config (the same object, seed and prior).
CHAIN_INHERITS = ("seed", "prompt", "prior.kind", "prior.name", "prior.dtype", "prior.references")


def _finished(workdir: str, steps: int) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(os.path.join(workdir, "final")) or not os.path.exists(path):
    return False
  with open(path) as f:
    lines = f.read().splitlines()
  return bool(lines) and json.loads(lines[-1])["step"] >= steps


def train_chain(configs, workdir: str, allow_changes=()) -> None:
  """Runs stages into DIR/stage<k>/, each starting from the one before (init_from).

  The later stages take CHAIN_INHERITS from the first config. A stage whose
  run has reached its steps and written its exports is skipped, an
  interrupted one resumes, so the same call continues the chain from any point.
  """
  flat = checks.flatten(configs[0])
  previous = ""
  for k, config in enumerate(configs, start=1):
    if k > 1:
      for field in CHAIN_INHERITS:
        *parents, name = field.split(".")
        node = config
        for parent in parents:
          node = node[parent]
        node[name] = flat[field]
      config.init_from = previous
    stage_dir = os.path.join(workdir, f"stage{k}")
    if _finished(stage_dir, config.steps):
      console.say(f"stage {k} ({config.representation}) is done in {stage_dir}; skipped")
    else:
      console.say(f"stage {k} ({config.representation}) in {stage_dir}")
      train_and_evaluate(config, stage_dir, allow_changes)
    previous = stage_dir
