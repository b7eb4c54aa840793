"""The work directory: the config record of each run segment, and safe restores.

  DIR/config.json                       the config of the first segment
  DIR/config.resume-<UTC time>.json     the config of each later segment
  DIR/checkpoints/<step>/               orbax checkpoints (atomic)
  DIR/checkpoints-damaged/<step>/       checkpoints that could not be restored

A rerun into a directory that holds a checkpoint resumes it, so its config must
describe the same optimisation: only the fields in MAY_CHANGE (and those that
the caller allows by name, except the ones in NEVER_CHANGE, which set the
state's shapes) may differ from config.json. Nothing is written before that
check has passed.
"""

import contextlib
import datetime
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import orbax.checkpoint as ocp

from vsdjax import checks, console
from vsdjax.training import sharding

# Fields that may differ on resume: how long, how often to log, preview and save, where the
# compile cache is, how the devices are used and the UNet calls batched, exports.
MAY_CHANGE = (
  "steps",
  "sharding.",
  "eps_phi.batch_with_prior",
  "mode",
  "log_every",
  "preview_every",
  "checkpoint_every",
  "keep_checkpoints",
  "compile_cache",
  "export.",
)
# Fields that set the shapes or the meaning of the saved state: a run cannot continue with
# others (the tet grid's box places a DMTet particle's sdf values; texture_from_nerf sets
# the texture field's sizes; optim.weight_decay > 0 gives AdamW's optimiser state, 0 Adam's).
NEVER_CHANGE = (
  "seed",
  "n_particles",
  "representation",
  "init_from",
  "mesh.grid_resolution",
  "mesh.fit_box",
  "mesh.box_margin",
  "mesh.texture_from_nerf",
  "optim.weight_decay",
  "guidance.mode",
  "prior.kind",
  "prior.references",
  "eps_phi.mode",
  "eps_phi.rank",
  "eps_phi.tiny_channels",
  "scene.",
  "render.resolution",
)
# Fields added after runs were recorded without them, with the value that reproduces those
# runs: a run whose config.json lacks one resumes when the new config has that value. ANY:
# the field acted on no run recorded without it (the mesh stages came later), so any value.
ANY = object()
ADDED_FIELDS = {
  "init_from": "",
  "views_per_step": 1,
  "prior.reference_render": "rgb",
  "prior.attention": "diffusers",
  "scene.albedo_init_std": 0.0,
  "render.ray_batch": 0,
  "render.occupancy_grid": 0,
  "render.occupancy_threshold": ANY,  # with occupancy_grid 0, no grid
  "render.occupancy_decay": ANY,
  "render.occupancy_every": ANY,
  "guidance.front_threshold": 45.0,
  "guidance.back_threshold": 45.0,
  "camera.sphere_prob": 0.0,
  "loss.opaque_step": 0,
  "optim.weight_decay": 0.0,
  "mesh.grid_resolution": ANY,
  "mesh.max_faces": ANY,
  "mesh.iso": ANY,
  "mesh.init_shape": ANY,
  "mesh.normal_consistency": ANY,
  "mesh.laplacian": ANY,
  "mesh.supersample": 1,
  "mesh.close_holes": 0,
  "mesh.outlier_faces": 0.0,
  "mesh.texture_from_nerf": True,
  "mesh.fit_box": False,
  "mesh.box_margin": ANY,  # with fit_box False, no fitted box
}


def with_added_fields(recorded: dict) -> dict:
  """A recorded config (nested dict, as config.json holds it) with the ADDED_FIELDS it lacks
  set to the values that reproduce it (ANY ones left out); changed in place and returned."""
  for field, value in ADDED_FIELDS.items():
    if value is ANY:
      continue
    *sections, name = field.split(".")
    node = recorded
    for section in sections:
      node = node.setdefault(section, {})
    node.setdefault(name, value)
  return recorded


def _matches(field: str, patterns) -> bool:
  return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def has_checkpoint(workdir: str) -> bool:
  """Whether DIR/checkpoints holds a checkpoint step folder (no orbax call)."""
  path = checkpoint_dir(workdir)
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def config_differences(saved: dict, new: dict) -> list:
  """[(field, saved value, new value)] of two flattened configs, sorted by field."""
  missing = "<absent>"
  return [
    (k, saved.get(k, missing), new.get(k, missing))
    for k in sorted(set(saved) | set(new))
    if saved.get(k, missing) != new.get(k, missing)
  ]


def check_resume(config, workdir: str, allow_changes=()) -> bool:
  """Whether `config` resumes a run in `workdir`; raises ConfigError if it cannot.

  Reads DIR/config.json when DIR holds a checkpoint and compares it with
  `config`; writes nothing. A field that differs must be in MAY_CHANGE, or be
  named in `allow_changes` and not be in NEVER_CHANGE. A field the run's
  config.json lacks compares as its ADDED_FIELDS value.
  """
  for field in allow_changes:
    if _matches(field, NEVER_CHANGE):
      raise checks.ConfigError(
        f"--allow_change={field}: this field sets the shapes or the "
        "identity of the saved state and cannot change on resume"
      )
  if not has_checkpoint(workdir):
    return False
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = checks.flatten(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise checks.ConfigError(
      f"{path} cannot be read ({e}), so the run in {workdir} cannot be checked "
      "against the new config; restore the file or use a new --workdir"
    ) from e
  new = checks.flatten(json.loads(config.to_json_best_effort()))
  for k, value in ADDED_FIELDS.items():
    if k not in saved and k in new:
      saved[k] = new[k] if value is ANY else value
  refused = [
    (k, a, b)
    for k, a, b in config_differences(saved, new)
    if not (_matches(k, MAY_CHANGE) or k in allow_changes)
  ]
  if refused:
    listing = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in refused)
    raise checks.ConfigError(
      f"{workdir} holds a run with another config ({listing}). Use a new --workdir, or "
      f"change only {', '.join(p + '*' if p.endswith('.') else p for p in MAY_CHANGE)} "
      "on resume (--allow_change=FIELD accepts a field that does not set the state's "
      "shapes, e.g. a moved model folder)"
    )
  return True


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_config(config, workdir: str, resumed: bool) -> str:
  """Writes the segment's config: DIR/config.json, or a dated copy when resuming."""
  os.makedirs(workdir, exist_ok=True)
  name = "config.json"
  if resumed:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"config.resume-{stamp}.json"
  path = os.path.join(workdir, name)
  _write_atomic(path, config.to_json_best_effort(indent=2))
  return path


@contextlib.contextmanager
def _stderr_to(file):
  """Sends file descriptor 2 (Python's and C++'s stderr) to `file` for a while.

  After an exception it waits (up to 10 s) until nothing more is written: a
  failed orbax restore leaves reader tasks that print as they end.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    yield
  except BaseException:
    size, quiet, deadline = -1, 0, time.time() + 10.0
    while quiet < 3 and time.time() < deadline:
      gc.collect()
      time.sleep(0.2)
      quiet = quiet + 1 if os.fstat(file.fileno()).st_size == size else 0
      size = os.fstat(file.fileno()).st_size
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _drop_leftovers_of_failed_reads(log_path: str) -> None:
  """Sends what orbax's abandoned reader tasks print when collected to `log_path`.

  A failed restore leaves coroutines and tasks behind that print their error
  (pages of TensorStore specs) whenever they are garbage collected, later in
  the run; this process-wide hook and filter keep them in the log file.
  """

  def from_orbax(text: str) -> bool:
    return "orbax" in text and ("_read_array_index" in text or "deserialize" in text)

  def write(text: str) -> None:
    with open(log_path, "a") as f:
      f.write(text + "\n")

  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and from_orbax(code.co_filename + code.co_name):
      write(f"{unraisable.err_msg}: {unraisable.object!r}: {unraisable.exc_value!r}")
      return
    previous(unraisable)

  def keep(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + logging.Formatter().formatException(record.exc_info)
    if from_orbax(text):
      write(text)
      return False
    return True

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(keep)


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=False
  )  # The step donates the state it saves.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def restore(config, workdir: str, abstract_state):
  """(state, manager): the newest checkpoint that restores, or (None, manager).

  A checkpoint that fails to restore is reported in one line and moved to
  DIR/checkpoints-damaged/ (never deleted) once an older one has restored;
  when none restores, UserError lists why and nothing is moved.
  """
  mngr = checkpoint_manager(config, workdir)
  failures = []
  for step in sorted(mngr.all_steps(), reverse=True):
    log = tempfile.NamedTemporaryFile(
      prefix=f"vsdjax-restore-{step}-", suffix=".log", delete=False
    )  # Outside DIR: nothing written there yet.
    try:
      with _stderr_to(log):  # tensorstore's reader tasks print pages on a bad file
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise many types)
      _drop_leftovers_of_failed_reads(log.name)
      first = str(e).splitlines()[0].split(". See full")[0] if str(e) else ""
      reason = f"{type(e).__name__}: {first}"[:300]
      failures.append((step, reason, log.name))
      console.say(
        f"checkpoint {step} in {checkpoint_dir(workdir)} cannot be restored "
        f"({reason}); trying an older one"
      )
      continue
    finally:
      log.close()
    os.remove(log.name)
    if failures and sharding.is_writer():  # One process moves them (multi-host runs).
      damaged = os.path.join(os.path.abspath(workdir), "checkpoints-damaged")
      os.makedirs(damaged, exist_ok=True)
      for bad, _, details in failures:
        target = os.path.join(damaged, str(bad))
        if os.path.exists(target):
          target += "-" + datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        shutil.move(os.path.join(checkpoint_dir(workdir), str(bad)), target)
        console.say(
          f"moved the damaged checkpoint {bad} to {target} (its restore errors "
          f"are in {details}); resuming from step {step}"
        )
    if failures:
      sharding.barrier("moved damaged checkpoints")
      mngr = checkpoint_manager(config, workdir)  # Forget the moved steps.
    return state, mngr
  if failures:
    raise checks.UserError(
      f"no checkpoint in {checkpoint_dir(workdir)} restores: "
      + "; ".join(f"step {s}: {r} (details: {d})" for s, r, d in failures)
      + ". Nothing was moved; use a new --workdir, or check that the code and config "
      "match the run's"
    )
  return None, mngr
