"""Runs over a device mesh (training/sharding.py).

The device count is fixed when JAX starts, so the run on 8 host CPU devices
and the two-process run (2 x 2 devices, jax.distributed over localhost) are
subprocesses of tests/sharded_run.py; each is compared with the same tiny run
(4 particles, 2 views per step: helpers.sharded_config) on this process's one
device. The particles are images (the 2D experiment) trained with VSD: the
cheapest program to compile (a NeRF's takes minutes here) that has particle
state, per-view renders and eps_phi's all-reduced gradient; the mesh code
does not depend on the representation.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from vsdjax import checks, train
from vsdjax.training import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3
# Reduction orders differ across devices (eps_phi's gradient is an all-reduce), and Adam
# (eps 1e-15) divides by the gradients' own size, so entries drift apart by float noise.
RTOL, ATOL = 1e-3, 3e-4


def test_mesh_shape_rules():
  c = helpers.tiny_config(n_particles=4, views_per_step=2)
  assert sharding.mesh_shape(c, 8) == (4, 2)
  assert sharding.mesh_shape(c, 4) == (4, 1)
  assert sharding.mesh_shape(c, 1) == (1, 1)
  c.n_particles = 6  # gcd(6, 8) = 2 particle devices, then gcd(2, 4) = 2 view devices
  assert sharding.mesh_shape(c, 8) == (2, 2)
  c.n_particles = 4
  c.sharding.particles = 3
  with pytest.raises(
    checks.ConfigError, match="sharding.particles=3 does not divide n_particles=4"
  ):
    sharding.mesh_shape(c, 8)
  c.sharding.particles, c.sharding.views = 2, 4
  with pytest.raises(checks.ConfigError, match="sharding.views=4 does not divide views_per_step=2"):
    sharding.mesh_shape(c, 8)
  c.sharding.particles, c.sharding.views = 4, 2
  with pytest.raises(checks.ConfigError, match="need 8 devices; 4 are visible"):
    sharding.mesh_shape(c, 4)


def _run(workdir, out, devices, *args, processes=1, port=0, timeout=600):
  """Starts sharded_run.py in `processes` processes of `devices` CPU devices each; waits."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES=str(devices),
    PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
  )
  command = [sys.executable, os.path.join(HERE, "sharded_run.py"), "--workdir", str(workdir)]
  command += ["--out", str(out), *args]
  if processes > 1:
    command += ["--processes", str(processes), "--port", str(port)]
  procs = [
    subprocess.Popen(
      command + ["--process_id", str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return np.load(out)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The leaves of the final state of the tiny run on this process's one device."""
  config = helpers.sharded_config("image", STEPS)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(train, "export_all", lambda *args: None)  # Not compared.
    state = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("one") / "run"))
  assert jax.tree.leaves(state["particles"])[0].sharding.num_devices == 1
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _assert_same_state(result, expected):
  leaves = [result[f"leaf_{i}"] for i in range(len(expected))]
  assert f"leaf_{len(expected)}" not in result
  for got, want in zip(leaves, expected):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _assert_placement(result, devices_per_particle: int, particles_per_device: int):
  """Each particle's arrays live on its own slice of devices; eps_phi on all."""
  holders = result["particle_devices"]  # [n, devices] bool
  assert holders.shape == (4, int(result["devices"]))
  assert (holders.sum(1) == devices_per_particle).all()
  assert (holders.sum(0) == particles_per_device).all()
  assert bool(result["phi_replicated"])


def test_eight_devices_match_one(tmp_path, one_device):
  # A 4 x 2 mesh: one render per device, each particle on its pair of devices.
  args = ("--representation", "image", "--no-export")
  result = _run(tmp_path / "run", tmp_path / "out.npz", 8, *args)
  _assert_same_state(result, one_device)
  _assert_placement(result, devices_per_particle=2, particles_per_device=1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _hostname_is_loopback() -> bool:
  try:
    return socket.gethostbyname(socket.gethostname()).startswith("127.")
  except OSError:  # A hostname that does not resolve (a container without /etc/hosts).
    return False


@pytest.mark.skipif(
  not _hostname_is_loopback(),
  reason="jax's CPU collectives (gloo) bind to the hostname's address, which is not a "
  "resolvable loopback one",
)
def test_two_processes_checkpoint_resume_and_match_one(tmp_path, one_device):
  # 2 processes x 2 devices, a 2 x 2 mesh (2 particles per device pair, their views split
  # over it); steps 1-2 and their checkpoint, then a rerun that resumes for step 3.
  workdir, out = tmp_path / "run", tmp_path / "out.npz"
  args = ("--representation", "image", "--mesh", "2x2", "--steps", f"2,{STEPS}")
  result = _run(workdir, out, 2, *args, processes=2, port=_free_port())
  assert len(list(workdir.glob("config.resume-*.json"))) == 1  # The second segment resumed.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", str(STEPS)]
  with open(workdir / "metrics.jsonl") as f:  # Written once, by process 0.
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  assert os.path.isfile(workdir / "final" / "eval.json")  # Process 0 exported.
  _assert_same_state(result, one_device)
  _assert_placement(result, devices_per_particle=2, particles_per_device=2)
  # The checkpoint of 4 devices in 2 processes restores onto this process's one device.
  config = helpers.sharded_config("image", STEPS + 1)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(train, "export_all", lambda *args: None)
    state = train.train_and_evaluate(config, str(workdir), allow_changes=("steps",))
  assert int(state["step"]) == STEPS + 1
