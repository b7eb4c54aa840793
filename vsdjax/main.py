"""Command line entry point (kept thin; the loop is vsdjax/train.py).

  python -m vsdjax.main --config experiments/toy.py --workdir workdirs/toy \
      [--config.steps=100 --config.n_particles=4 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir;
`--config.mode=export` only writes the exports of the latest checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from vsdjax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (config, metrics, "
                               "checkpoints, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
