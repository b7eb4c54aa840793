"""A numpy model of the 2D VSD spread: why toy2d's spread has a floor.

The 2D experiment (experiments/toy2d.py) with one Gaussian reference
N(m, sigma_ref^2 I) should end with particles whose per-pixel std ("spread")
is sigma_ref. This script runs the same particle update without any network:
eps_phi is replaced by the exact noise prediction of a Gaussian fitted to the
particles (their mean, their mean per-pixel variance), plus white noise of
std --phi-error standing in for a learned eps_phi's error. Everything else
follows train_step: t ~ U[t_min, t_max] per particle, w(t) = 1 - abar_t,
grad = w(t) (eps_prior(x_t) - eps_phi(x_t)), Adam(b1 0.9, b2 0.99) or SGD on
the pixels, particles initialised N(0, 0.5^2) like init_state.

--memorise mixes in the exact noise prediction of the n particles as point
masses (what a network that memorised its training images answers: each
particle's own noise at small t, SDS's update).

Prints one JSON line per (sigma_ref, phi_error, memorise, optimiser, steps). With an
exact eps_phi the spread approaches sigma_ref as steps grow (slowly: the
force that corrects it acts mostly at small t, where w(t) is small); an
error of a few hundredths in eps_phi leaves a floor near 0.1, with Adam at
toy2d's lr 1e-2 and with SGD alike: once the true gradient of a particle is
small, eps_phi's error is what moves it.

  python benchmarks/spread_model.py
  python benchmarks/spread_model.py --sigmas 0.05,0.1 --phi-errors 0.02 --steps 500,2000
"""

import argparse
import json

import numpy as np

from vsdjax.prior import schedule


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  floats = lambda s: [float(v) for v in s.split(",")]
  ints = lambda s: [int(v) for v in s.split(",")]
  p.add_argument("--sigmas", type=floats, default=[0.0, 0.05, 0.1, 0.2])
  p.add_argument("--phi-errors", type=floats, default=[0.0, 0.02, 0.05])
  p.add_argument("--steps", type=ints, default=[500, 2000])
  p.add_argument("--memorise", type=floats, default=[0.0], help="eps_phi's share of point masses")
  p.add_argument("--optimisers", default="adam,sgd", help="comma-separated, of adam, sgd")
  p.add_argument("--adam-lr", type=float, default=1e-2, help="toy2d's optim.lr")
  p.add_argument("--sgd-lr", type=float, default=0.3)
  p.add_argument("--particles", type=int, default=8)
  p.add_argument("--pixels", type=int, default=16 * 16 * 3)
  p.add_argument("--t-range", type=floats, default=[0.02, 0.98])
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def spread(
  sigma_ref: float,
  phi_error: float,
  optimiser: str,
  lr: float,
  steps: int,
  n: int,
  d: int,
  t_range,
  seed: int,
  memorise: float = 0.0,
) -> float:
  """Mean per-pixel std of n particles after `steps` updates.

  Particles x [n, d] in x0 units; the prior is N(m, sigma_ref^2 I) with m
  uniform in [-1, 1]^d. eps_phi is (1 - memorise) times the fitted
  Gaussian's noise prediction plus `memorise` times that of the n particles
  as point masses (the exact denoiser of the training set, which answers
  each particle's own noise at small t), plus white noise of std phi_error.
  """
  rng = np.random.default_rng(seed)
  abar = schedule.alphas_cumprod(schedule.SD_SCHEDULER)  # [T]
  num_t = abar.shape[0]
  t_lo, t_hi = (int(round(f * num_t)) for f in t_range)
  m = rng.uniform(-1.0, 1.0, d)
  x = 0.5 * rng.standard_normal((n, d))
  m1, m2 = np.zeros_like(x), np.zeros_like(x)
  for k in range(1, steps + 1):
    t = rng.integers(t_lo, t_hi + 1, n)
    a, s = np.sqrt(abar[t])[:, None], np.sqrt(1.0 - abar[t])[:, None]  # [n, 1]
    x_t = a * x + s * rng.standard_normal((n, d))
    mean, var = x.mean(axis=0), x.var(axis=0).mean()
    eps_prior = s * (x_t - a * m) / (a**2 * sigma_ref**2 + s**2)
    eps_phi = s * (x_t - a * mean) / (a**2 * var + s**2) + phi_error * rng.standard_normal((n, d))
    if memorise:
      eps_phi = (1.0 - memorise) * eps_phi + memorise * _points_eps(x, x_t, a, s)
    grad = s**2 * (eps_prior - eps_phi)  # w(t) = 1 - abar_t = s_t^2
    if optimiser == "adam":
      m1 = 0.9 * m1 + 0.1 * grad
      m2 = 0.99 * m2 + 0.01 * grad**2
      x = x - lr * (m1 / (1 - 0.9**k)) / (np.sqrt(m2 / (1 - 0.99**k)) + 1e-15)
    else:
      x = x - lr * grad
  return float(x.std(axis=0).mean())


def _points_eps(points, x_t, a, s):
  """E[eps | x_t] when x0 is uniform over `points` [n, d]: x_t [n, d], a, s [n, 1]."""
  diff = x_t[:, None] - a[:, :, None] * points[None]  # [n, n, d]
  logits = -0.5 * np.sum(np.square(diff), axis=-1) / s**2  # [n, n]
  w = np.exp(logits - logits.max(axis=1, keepdims=True))
  w /= w.sum(axis=1, keepdims=True)
  return np.einsum("ij,ijd->id", w, diff) / s


def main():
  args = parse_args()
  for optimiser in args.optimisers.split(","):
    if optimiser not in ("adam", "sgd"):
      raise SystemExit(f"--optimisers: unknown {optimiser!r}, expected adam or sgd")
    lr = args.adam_lr if optimiser == "adam" else args.sgd_lr
    for sigma_ref in args.sigmas:
      for phi_error in args.phi_errors:
        for memorise in args.memorise:
          for steps in args.steps:
            value = spread(
              sigma_ref,
              phi_error,
              optimiser,
              lr,
              steps,
              args.particles,
              args.pixels,
              args.t_range,
              args.seed,
              memorise,
            )
            record = {
              "bench": "vsd_spread_model",
              "sigma_ref": sigma_ref,
              "phi_error": phi_error,
              "memorise": memorise,
              "optimiser": optimiser,
              "lr": lr,
              "steps": steps,
              "spread": round(value, 4),
              "spread_over_sigma_ref": (round(value / sigma_ref, 2) if sigma_ref else None),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
