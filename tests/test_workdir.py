"""The work directory cannot be corrupted: config checks before any write, resume
checks against the saved config, damaged checkpoints, SIGINT / SIGTERM, and the
command line's one-line errors (subprocesses of `python -m vsdjax.main`).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import sds, toy, toy2d, vsd
from helpers import leaves, tiny_config
from vsdjax import checks, defaults, train
from vsdjax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# toy2d at toy size with SDS (no eps_phi: compiles in seconds), as command-line overrides.
TOY2D_FLAGS = [
  "--config.n_particles=2",
  "--config.render.resolution=8",
  "--config.render.resolution_after=8",
  "--config.guidance.mode=sds",
]


def _config_2d(**overrides):
  """The cheapest trainer config: 2D, SDS, 3 particles of 8x8 pixels."""
  base = {
    "representation": "image",
    "guidance.mode": "sds",
    "n_particles": 3,
    "steps": 4,
    "checkpoint_every": 2,
    "keep_checkpoints": 5,
  }
  return tiny_config(**{**base, **overrides})


def _main(*args, timeout=300, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "vsdjax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


def _error_lines(stderr: str) -> list:
  """The error lines of a run's stderr (progress lines start with "vsdjax: " too)."""
  assert "Traceback" not in stderr, stderr
  return [l for l in stderr.splitlines() if l.startswith("vsdjax: error:")]


@pytest.mark.parametrize("module", [toy, toy2d, vsd, sds])
def test_every_experiment_and_the_defaults_validate(module):
  checks.validate_config(module.get_config())
  checks.validate_config(defaults.get_config())


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("n_particles", 0, "n_particles: must be an integer >= 1"),
    ("steps", -1, "steps: must be an integer >= 0"),
    ("mode", "exprt", "mode: must be one of 'train', 'export'"),
    ("guidance.mode", "vds", "guidance.mode: must be one of 'vsd', 'sds'"),
    ("guidance.t_max", 1.5, r"guidance.t_max: must be in \[0.0, 1.0\]"),
    ("guidance.t_min", 0.99, "guidance.t_max: must be >= guidance.t_min"),
    ("guidance.front_threshold", 200.0, r"guidance.front_threshold: must be in \[0.0, 180.0\]"),
    ("guidance.front_threshold", 160.0, "guidance.front_threshold / back_threshold: front \\+"),
    ("camera.sphere_prob", 1.5, "camera.sphere_prob"),
    ("loss.opaque_step", -1, "loss.opaque_step"),
    ("mesh.outlier_faces", 1.5, r"mesh.outlier_faces: must be in \[0.0, 1.0\]"),
    ("export.mesh_outlier_faces", -0.1, "export.mesh_outlier_faces"),
    ("eps_phi.steps_per_step", 0, "eps_phi.steps_per_step"),
    ("eps_phi.camera_dropout", 1.5, "eps_phi.camera_dropout"),
    ("prior.dtype", "float16", "prior.dtype: must be one of 'float32', 'bfloat16'"),
    ("prior.kind", "sd", "prior.kind"),
    ("prior.references", "sphere,pyramid", "prior.references: .*unknown shape 'pyramid'"),
    ("prompt", "a hamburger", "prompt: .*'a hamburger' names no component"),
    ("prompt", "a green sphere", "prompt: .*green, a colour no reference has.*red sphere, blue"),
    ("render.resolution", 0, "render.resolution"),
    ("render.resolution", 10, "render.resolution: must be a multiple of 4"),
    ("render.chunk", 3, "render"),
    ("scene.n_levels", 0, "scene.n_levels: must be an integer >= 1"),
    ("scene.shading", "phong", "scene.shading"),
    ("scene.random_bg_prob", 2.0, "scene.random_bg_prob"),
    ("camera.fovy", (50.0, 10.0), "camera.fovy: needs min <= max"),
    ("optim.b2", 1.5, "optim.b2"),
    ("loss.sparsity", -1.0, "loss.sparsity"),
    ("log_every", 0, "log_every"),
    ("representation", "mesh", "representation: must be one of 'nerf', 'image'"),
  ],
)
def test_bad_fields_are_named_before_anything_is_written(tmp_path, field, value, message):
  c = tiny_config(**{field: value, "eps_phi.tiny_channels": (64, 64, 64)})
  start = time.time()
  with pytest.raises(checks.ConfigError, match=message):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert time.time() - start < 20
  assert not (tmp_path / "run").exists()


def test_an_unknown_field_is_refused_with_a_suggestion():
  c = tiny_config()
  c.render.resolutoin = 64  # A typo in an experiment file adds a field.
  with pytest.raises(checks.ConfigError, match="render.resolutoin is unknown.*render.resolution"):
    checks.validate_config(c)


@pytest.mark.slow
def test_resume_checks_the_saved_config(tmp_path, monkeypatch):
  run = str(tmp_path / "run")
  fetched = []
  real_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x) or real_get(x))
  train.train_and_evaluate(_config_2d(steps=2, log_every=2), run)
  assert sum(isinstance(x, dict) and "loss" in x for x in fetched) == 1  # logging steps only
  saved = (tmp_path / "run" / "config.json").read_bytes()
  for field, value in (("optim.lr", 0.5), ("n_particles", 2), ("prior.sigma_ref", 0.1)):
    with pytest.raises(checks.ConfigError, match=rf"{field}: .* in the run, .* now.*--workdir"):
      train.train_and_evaluate(_config_2d(**{field: value}), run)
  with pytest.raises(checks.ConfigError, match="n_particles: this field sets the shapes"):
    train.train_and_evaluate(_config_2d(n_particles=2), run, allow_changes=["n_particles"])
  with pytest.raises(checks.ConfigError, match="mesh.fit_box: this field sets"):
    train.train_and_evaluate(_config_2d(), run, allow_changes=["mesh.fit_box"])
  assert (tmp_path / "run" / "config.json").read_bytes() == saved
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  # steps, logging and exports may change; a named field may too.
  train.train_and_evaluate(_config_2d(steps=3, log_every=1), run)
  train.train_and_evaluate(
    _config_2d(**{"steps": 4, "optim.lr": 0.02}), run, allow_changes=["optim.lr"]
  )
  segments = sorted(glob.glob(str(tmp_path / "run" / "config.resume-*.json")))
  steps = []
  for p in segments:
    with open(p) as f:
      steps.append(json.load(f)["steps"])
  assert steps == [3, 4]
  assert json.loads(saved)["steps"] == 2
  assert (tmp_path / "run" / "config.json").read_bytes() == saved


@pytest.mark.slow
def test_a_run_recorded_before_fields_were_added_resumes_with_the_values_it_had(tmp_path):
  config = vsd.get_config()
  recorded = json.loads(config.to_json_best_effort())
  for field in workdir_lib.ADDED_FIELDS:
    section, _, name = field.rpartition(".")
    del (recorded[section] if section else recorded)[name]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  # Today's defaults differ from what such a run did: each difference is named.
  with pytest.raises(checks.ConfigError) as refused:
    workdir_lib.check_resume(config, str(tmp_path))
  for text in ("mesh.fit_box: False in the run, True now", "camera.sphere_prob: 0.0 in the run"):
    assert text in str(refused.value)
  assert "mesh.iso" not in str(refused.value)  # ANY: it acted on no such run
  old = workdir_lib.with_added_fields(json.loads(json.dumps(recorded)))
  assert old["mesh"]["fit_box"] is False and "iso" not in old["mesh"]
  # The values the run had resume it; the fields marked ANY take any value.
  for field, value in workdir_lib.ADDED_FIELDS.items():
    if value is not workdir_lib.ANY:
      section, _, name = field.rpartition(".")
      (config[section] if section else config)[name] = value
  config.mesh.iso = 3.0
  assert workdir_lib.check_resume(config, str(tmp_path))


def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys):
  full = train.train_and_evaluate(_config_2d(steps=6), str(tmp_path / "full"))
  run = tmp_path / "run"
  train.train_and_evaluate(_config_2d(steps=4), str(run))
  data = max(
    glob.glob(str(run / "checkpoints" / "4" / "**" / "d" / "*"), recursive=True),
    key=os.path.getsize,
  )
  with open(data, "r+b") as f:
    f.truncate(100)
  resumed = train.train_and_evaluate(_config_2d(steps=6), str(run))
  err = capsys.readouterr().err
  assert "checkpoint 4 in" in err and "cannot be restored" in err
  assert "resuming from step 2" in err
  assert (run / "checkpoints-damaged" / "4").is_dir()  # kept, not deleted
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]
  for a, b in zip(leaves(full), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _wait_for_steps(path: str, n: int, proc, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        if len(f.read().splitlines()) >= n:
          return
    time.sleep(0.02)
  raise AssertionError(f"{path} did not reach {n} lines")


def _restore(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_saves_the_current_step_and_the_rerun_resumes(tmp_path, signum):
  run, steps = str(tmp_path / "run"), 1500
  flags = [
    "--config",
    "experiments/toy2d.py",
    "--workdir",
    run,
    f"--config.steps={steps}",
    "--config.log_every=1",
    "--config.checkpoint_every=5000",
    *TOY2D_FLAGS,
  ]
  with open(tmp_path / "stderr.txt", "w") as stderr:
    proc = subprocess.Popen(
      [sys.executable, "-m", "vsdjax.main", *flags],
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stderr=stderr,
    )
    _wait_for_steps(os.path.join(run, "metrics.jsonl"), 3, proc)
    proc.send_signal(signum)
    proc.wait(timeout=120)
  err = (tmp_path / "stderr.txt").read_text()
  assert proc.returncode == 128 + signum, err
  saved = [int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < steps, saved
  last = _error_lines(err)[-1]
  assert last.startswith(
    f"vsdjax: error: {signal.Signals(signum).name} at step {saved[0]}: saved checkpoint {saved[0]}"
  ), err
  if signum == signal.SIGINT:
    return  # The resume is checked once, with SIGTERM (what a preempted VM sends).
  done = _main(*flags)
  assert done.returncode == 0, done.stderr
  c = toy2d.get_config()
  c.steps, c.n_particles, c.checkpoint_every, c.guidance.mode = steps, 2, 5000, "sds"
  c.render.resolution = c.render.resolution_after = 8
  train.train_and_evaluate(c, str(tmp_path / "full"))
  a, b = _restore(run, steps), _restore(str(tmp_path / "full"), steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(run, "metrics.jsonl")) as f:
    logged = [json.loads(l)["step"] for l in f]
  assert logged == list(range(1, steps + 1))


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text('{"steps": 7}')
  (run / "checkpoints" / "7").mkdir(parents=True)
  # A mistyped config path leaves an existing run's config.json as it was (with and
  # without overrides, which fail at flag parsing).
  for overrides in ([], ["--config.steps=7"]):
    out = _main("--config", "experiments/toyy.py", "--workdir", str(run), *overrides)
    assert out.returncode == 2
    assert [l for l in out.stderr.splitlines() if l.strip()] == _error_lines(out.stderr)
    assert len(_error_lines(out.stderr)) == 1
    assert "--config" in _error_lines(out.stderr)[0] and "toyy.py" in _error_lines(out.stderr)[0]
  assert (run / "config.json").read_text() == '{"steps": 7}'
  # A misspelt field, a bad value, missing weights: one line each, naming the field.
  for flags, expected in (
    (["--config.stepz=3"], '"steps" instead of "stepz"'),
    (["--config.n_particles=0"], "config field n_particles: must be an integer"),
    (["--config.prior.name=" + str(tmp_path / "no-weights")], "config field prior.name="),
  ):
    out = _main("--config", "experiments/vsd.py", "--workdir", str(tmp_path / "new"), *flags)
    lines = _error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr
    assert "--config.prior.name=/path" in lines[0] or "prior.name" not in expected
    assert out.stderr.rstrip().endswith("--debug prints it)")  # the error is the last line


@pytest.mark.slow
def test_help_names_every_experiment_config():
  out = _main("--help")
  assert out.returncode == 0, out.stderr
  for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    assert os.path.basename(path) in out.stdout
  assert "vsdjax/defaults.py" in out.stdout and "resume" in out.stdout.lower()
