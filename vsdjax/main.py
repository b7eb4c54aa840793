"""vsdjax: text-to-3D with Variational Score Distillation (ProlificDreamer) in JAX.

  python -m vsdjax.main --config experiments/CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]

Configs (experiments/):
  toy.py       VSD on the analytic prior in 3D (procedural shapes), minutes on a CPU
  toy2d.py     the paper's 2D experiment on the analytic prior: particles are images
  toy_geometry.py, toy_texture.py
               stages 2 and 3 on the analytic prior (--config.init_from=the stage before)
  vsd.py       ProlificDreamer stage 1 (NeRF) on Stable Diffusion 2.1-base (needs the weights)
  vsd_geometry.py, vsd_texture.py
               ProlificDreamer stages 2 (DMTet geometry) and 3 (texture)
  sds.py       the SDS (DreamFusion) baseline on the same model

All three stages in one work directory (DIR/stage1, stage2, stage3; rerun to
continue from any point):
  python -m vsdjax.main --config experiments/vsd.py --workdir DIR \
      --chain experiments/vsd_geometry.py,experiments/vsd_texture.py --config.prompt="..."

Every config field is listed and commented in vsdjax/defaults.py; override any
of them on the command line, e.g. --config.steps=100 --config.n_particles=4
--config.prior.name=/path/to/stable-diffusion-2-1-base.

Resume: run the same command again; it continues from the newest checkpoint in
DIR/checkpoints (Ctrl-C or SIGTERM saves one first). Only steps, logging,
preview, checkpoint, export, compile_cache, sharding and eps_phi.batch_with_prior
fields may change on resume; --allow_change=FIELD accepts another (e.g.
prior.name for a moved model folder).
Export: --config.mode=export writes DIR/final/ again from the latest checkpoint.
Devices: one run uses every device it sees (particles x views, config sharding.*);
a multi-host run starts the same command on every host with --distributed.
Errors print one line; --debug prints the traceback.
"""

import importlib.util
import os
import sys
import tempfile
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vsdjax import checks, train
from vsdjax.training import sharding

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (experiments/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Work directory (config, metrics, checkpoints, exports); rerun to resume."
)
_ALLOW = flags.DEFINE_list(
  "allow_change",
  [],
  "Config fields that may differ from the "
  "run in --workdir when resuming (not those that set the state's "
  "shapes).",
)
_CHAIN = flags.DEFINE_list(
  "chain",
  [],
  "Config files of later stages: --config runs into DIR/stage1, each of these "
  "into the next DIR/stage<k> from the one before (init_from).",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "A multi-host run (TPU pod slice, several GPU nodes): start this command once per host; "
  "calls jax.distributed.initialize(), which finds the cluster on Cloud TPU, SLURM, Open MPI "
  "and Kubernetes; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), "
  "JAX_NUM_PROCESSES and JAX_PROCESS_ID.",
)
_DEBUG = flags.DEFINE_bool("debug", False, "Print the traceback of errors.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str, code: int = 2):
  """Prints one line (the traceback goes to a file) and exits with `code`."""
  with tempfile.NamedTemporaryFile("w", prefix="vsdjax-error-", suffix=".log", delete=False) as f:
    traceback.print_exc(file=f)
  print(
    f"vsdjax: error: {' '.join(str(message).split())} (traceback: {f.name}; --debug prints it)",
    file=sys.stderr,
  )
  sys.exit(code)


def _parse_flags(argv):
  """absl's flag parsing, with config-override mistakes as one line."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help exits 1 after printing the usage.
    sys.exit(0 if any(a in ("--help", "-h", "-?", "--helpshort") for a in argv) else e.code)
  except flags.Error as e:
    print(f"vsdjax: error: {e} (--help lists the flags)", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # The config file failed to load; an override then touches it.
    _fail(f"--config cannot be loaded: {str(e).splitlines()[-1].strip()}")
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    if isinstance(e, AttributeError) and isinstance(e.__context__, KeyError):
      e = e.__context__  # ml_collections' unknown field, with its "did you mean".
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    _fail(f"a --config.FIELD override: {detail}; every field is listed in vsdjax/defaults.py")


def _load_config(path: str):
  """get_config() of a --chain file."""
  spec = importlib.util.spec_from_file_location("vsdjax_chain_config", path)
  if spec is None or not os.path.isfile(path):
    raise checks.ConfigError(f"--chain: no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    config = _CONFIG.value
    config.keys()  # A file that failed to load raises here, not above.
  except (OSError, SyntaxError, ValueError) as e:
    if _DEBUG.value:
      raise
    _fail(
      f"--config {flags.FLAGS['config'].config_filename} cannot be loaded: "
      f"{str(e).splitlines()[-1].strip()}"
    )
  try:
    if _DISTRIBUTED.value:
      sharding.initialize_distributed()
    if _CHAIN.value:
      chain = [config] + [_load_config(path) for path in _CHAIN.value]
      train.train_chain(chain, _WORKDIR.value, allow_changes=_ALLOW.value)
    else:
      train.train_and_evaluate(config, _WORKDIR.value, allow_changes=_ALLOW.value)
  except checks.UserError as e:
    if _DEBUG.value:
      raise
    _fail(str(e), e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
