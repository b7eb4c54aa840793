"""Plots of a run's metrics and a contact sheet of its exports, while it trains or after.

  python -m vsdjax.report DIR

writes DIR/report/: a PNG per group of metrics in DIR/metrics.jsonl (losses,
gradient norms, t, eps_phi's loss, the 2D spread; reporting/plots.py) and
exports.png, the contact sheet of DIR/final/ once the run has written it
(reporting/sheet.py). Rerun it to update a report of a run that goes on.
For a chain (DIR/stage<k>/, main.py --chain) each stage's report goes to
DIR/report/stage<k>/.
"""

import argparse
import json
import os
import re
import sys

from vsdjax import checks
from vsdjax.reporting import plots, sheet


def _runs(workdir: str) -> list:
  """[(run folder, report folder)]: DIR itself, or each DIR/stage<k>/ of a chain."""
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return [(workdir, os.path.join(workdir, "report"))]
  stages = (
    sorted(
      (d for d in os.listdir(workdir) if re.fullmatch(r"stage\d+", d)), key=lambda d: int(d[5:])
    )
    if os.path.isdir(workdir)
    else []
  )
  runs = [(os.path.join(workdir, d), os.path.join(workdir, "report", d)) for d in stages]
  runs = [(run, out) for run, out in runs if os.path.exists(os.path.join(run, "metrics.jsonl"))]
  if not runs:
    raise checks.UserError(
      f"{workdir} holds no run: no metrics.jsonl in it or in a stage<k>/ folder "
      "(a run writes its first line after log_every steps)"
    )
  return runs


def _sigma_ref(run: str) -> float:
  """prior.sigma_ref of the run's config.json (0 without one)."""
  try:
    with open(os.path.join(run, "config.json")) as f:
      return float(json.load(f)["prior"]["sigma_ref"])
  except (OSError, KeyError, ValueError):
    return 0.0


def write_report(workdir: str) -> list:
  """Writes the report of the run (or chain) in `workdir`; returns the files written."""
  written = []
  for run, out in _runs(workdir):
    records = plots.read_metrics(os.path.join(run, "metrics.jsonl"))
    if records:
      written += plots.plot_metrics(records, out, _sigma_ref(run))
    sheet_path = os.path.join(out, "exports.png")
    if sheet.contact_sheet(os.path.join(run, "final"), sheet_path):
      written.append(sheet_path)
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vsdjax.report", description=__doc__.split("\n")[0]
  )
  parser.add_argument("workdir", metavar="DIR", help="a run's --workdir (or a chain's)")
  args = parser.parse_args(argv)
  try:
    written = write_report(args.workdir)
  except (checks.UserError, OSError, ValueError) as e:
    print(f"vsdjax.report: error: {e}", file=sys.stderr)
    return 2
  for path in written:
    print(path)
  if not written:
    print(f"{args.workdir}: no metrics or exports yet")
  return 0


if __name__ == "__main__":
  sys.exit(main())
