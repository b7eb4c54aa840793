"""PNG plots of a run's metrics.jsonl, one file per panel of PANELS.

  losses.png      'loss' and its terms 'loss_*'
  grad_norms.png  the guidance, particle (min-max band over the particles) and
                  eps_phi gradient norms, and the particles' update norms
  t.png           the sampled t (mean over the particles) and t_max (x 1000)
  phi_loss.png    eps_phi's diffusion loss (VSD)
  spread.png      the 2D experiment's per-pixel std across particles, with
                  prior.sigma_ref when config.json has one > 0

A panel is drawn when metrics.jsonl has one of its series. Lines are the
logged values; with more than SMOOTH_MIN points a moving average is drawn
over them. The file may be growing: a last line being written is skipped.
"""

import json
import os

from matplotlib.figure import Figure
import numpy as np

# (file name, title, series, y scale); a series 'name' with 'name_min' and
# 'name_max' in the records is drawn with that band.
PANELS = (
  ("losses", "losses", "loss*", "linear"),
  (
    "grad_norms",
    "gradient and update norms",
    ("guidance_grad_norm", "particle_grad_norm", "particle_update_norm", "phi_grad_norm"),
    "log",
  ),
  ("t", "t (diffusion step, mean over the particles) and t_max", ("t", "t_max"), "linear"),
  ("phi_loss", "eps_phi loss", ("phi_loss",), "log"),
  ("spread", "particle spread (per-pixel std across particles)", ("particle_spread",), "linear"),
)
# Series drawn times a factor to share their panel's axis: t_max is a fraction of the
# 1000 diffusion steps of both priors' schedules, t a step.
FACTORS = {"t_max": 1000}
# Points from which a moving average (window: a twentieth of them) is drawn too.
SMOOTH_MIN = 40


def read_metrics(path: str) -> list:
  """The records of a metrics.jsonl [{'step': s, name: value, ...}], in file order.

  A line that does not parse is skipped when it is the last one (a run still
  writing it), and an error otherwise.
  """
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
  return records


def _series(records: list, spec) -> list:
  """The metric names of a panel present in `records` (spec 'prefix*' or a tuple of names)."""
  names = {k for r in records for k in r}
  if isinstance(spec, str):
    prefix = spec.rstrip("*")
    return sorted(k for k in names if k == prefix or k.startswith(prefix + "_"))
  return [k for k in spec if k in names]


def _values(records: list, *names: str) -> list:
  """[steps [m], values [m] of each name] over the records that have every one of `names`."""
  rows = [[r["step"]] + [r[n] for n in names] for r in records if all(n in r for n in names)]
  return list(np.asarray(rows, np.float64).reshape(-1, 1 + len(names)).T)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """[m] -> [m - window + 1]: the mean of each `window` consecutive values."""
  return np.convolve(values, np.ones(window) / window, mode="valid")


def _panel(records: list, names: list, title: str, yscale: str, path: str, hline=None) -> None:
  """One panel's figure at `path`; hline (label, y): a dashed reference level."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  present = {k for r in records for k in r}
  positive = True
  for name in names:
    steps, values = _values(records, name)
    factor = FACTORS.get(name, 1)
    values = factor * values
    label = f"{name} x {factor}" if factor != 1 else name
    smooth = len(steps) > SMOOTH_MIN
    line = ax.plot(steps, values, lw=1, alpha=0.5 if smooth else 1.0, label=label)[0]
    if smooth:
      w = len(steps) // 20
      ax.plot(steps[w - 1 :], _moving_average(values, w), color=line.get_color(), lw=2)
    positive &= bool(np.all(values > 0))
    if {f"{name}_min", f"{name}_max"} <= present:
      band_steps, lo, hi = _values(records, f"{name}_min", f"{name}_max")
      ax.fill_between(band_steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
      positive &= bool(np.all(lo > 0))
  if hline is not None:
    ax.axhline(hline[1], color="k", ls="--", lw=1, label=hline[0])
  ax.set_yscale(yscale if positive else "linear")  # Log only where every value is > 0.
  ax.set_xlabel("step")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.savefig(path, dpi=100)


def plot_metrics(records: list, folder: str, sigma_ref: float = 0.0) -> list:
  """Writes folder/<panel>.png for each panel with data; returns their paths."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, title, spec, yscale in PANELS:
    names = _series(records, spec)
    if names:
      hline = (f"sigma_ref = {sigma_ref:g}", sigma_ref) if name == "spread" and sigma_ref else None
      paths.append(os.path.join(folder, f"{name}.png"))
      _panel(records, names, title, yscale, paths[-1], hline)
  return paths
