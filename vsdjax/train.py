"""The trainer: config -> models -> jitted steps -> metrics, checkpoints, exports.

Importable from notebooks:

  from vsdjax import train
  from experiments import toy
  state = train.train_and_evaluate(toy.get_config(), "workdirs/toy")

Work directory (design.md):
  DIR/config.json      the resolved config
  DIR/metrics.jsonl    one JSON object per logged step
  DIR/checkpoints/     orbax checkpoints (atomic); a rerun resumes from the latest
  DIR/final/           exports (particle_<i>/...) and, for the analytic prior, eval.json
"""
import json
import math
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from vsdjax import evaluate, export, models as models_lib, scene, train_step


class NonFiniteLossError(FloatingPointError):
  """A metric of the train step was NaN or infinite."""


def resolution_at(config, step: int) -> int:
  """Render size of step `step` (the 64 -> 512 schedule; one compilation each)."""
  r = config.render
  return r.resolution if step < r.resolution_step else r.resolution_after


def _checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)  # The step donates the state it saves.
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def _setup(config, workdir: str):
  """Models, frozen arrays, the initial or restored state and its checkpoint manager."""
  key = jax.random.PRNGKey(config.seed)
  k_models, k_init, k_steps = jax.random.split(key, 3)
  models, frozen = models_lib.build(config, k_models)
  mngr = _checkpoint_manager(config, workdir)
  init = lambda: train_step.init_state(config, models, frozen, k_init)
  latest = mngr.latest_step()
  if latest is None:
    state = init()
  else:
    abstract = jax.eval_shape(init)
    state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
  return models, frozen, state, mngr, k_steps


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops metric lines after `last_step` (written by a run that was killed)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(lines)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint), then exports; returns the state."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  models, frozen, state, mngr, k_steps = _setup(config, workdir)
  if config.mode == "export":
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"mode=export: no checkpoint in {workdir}/checkpoints")
    export_all(config, models, state, workdir)
    return state
  if config.mode != "train":
    raise ValueError(f"mode must be 'train' or 'export', got {config.mode!r}")

  start = int(state["step"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _truncate_metrics(metrics_path, start)
  steps = {}
  t0 = time.time()
  with open(metrics_path, "a") as log, tqdm.tqdm(
      total=config.steps, initial=start, desc="vsdjax", unit="step",
      dynamic_ncols=True) as bar:
    for step in range(start, config.steps):
      res = resolution_at(config, step)
      if res not in steps:
        steps[res] = train_step.make_train_step(config, models, frozen, res)
      state, metrics = steps[res](state, k_steps)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
      if bad:
        last = mngr.latest_step()
        raise NonFiniteLossError(
            f"step {step + 1}: non-finite {', '.join(bad)} "
            f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); stopped. The last good "
            f"checkpoint is step {last} in {workdir}/checkpoints" if last is not None
            else f"step {step + 1}: non-finite {', '.join(bad)}; stopped before any "
            "checkpoint was written")
      done = step + 1
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4g}", res=res)
      if done % config.log_every == 0 or done == config.steps:
        log.write(json.dumps({"step": done, **metrics, "resolution": res,
                              "seconds": round(time.time() - t0, 3)}) + "\n")
        log.flush()
      if done % config.checkpoint_every == 0 or done == config.steps:
        mngr.save(done, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  export_all(config, models, state, workdir)
  return state


def export_all(config, models, state, workdir: str) -> None:
  """Writes DIR/final/: per-particle exports and, for the analytic prior, eval.json."""
  final = os.path.join(workdir, "final")
  particles = jax.device_get(state["particles"])
  n = config.n_particles
  take = lambda i: jax.tree.map(lambda v: v[i], particles)
  e = config.export
  if config.dimension == 3:
    spec = scene.spec_from_config(config)
    for i in range(n):
      export.export_particle(
          take(i), spec, os.path.join(final, f"particle_{i}"), views=e.views,
          video_frames=e.video_frames, resolution=e.resolution,
          mesh_resolution=e.mesh_resolution, mesh_threshold=e.mesh_threshold)
    if models.is_analytic:
      result = evaluate.evaluate_3d(particles, spec, models.references,
                                    n_views=e.eval_views, size=config.render.resolution)
      evaluate.write_json(result, os.path.join(final, "eval.json"))
  else:
    for i in range(n):
      export.export_image(particles["image"][i],
                          os.path.join(final, f"particle_{i}", "image.png"))
    if models.is_analytic:
      cam = train_step.camera_2d()
      size = config.render.resolution
      means = np.asarray(train_step.reference_means(models, cam.c2w, cam.fovy, size)[0])
      result = evaluate.evaluate_2d(particles["image"], means,
                                    [r.shape for r in models.references],
                                    config.prior.sigma_ref)
      evaluate.write_json(result, os.path.join(final, "eval.json"))
