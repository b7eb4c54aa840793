"""The SDS (DreamFusion) baseline on the same model as experiments/vsd.py.

SDS is VSD with eps_phi replaced by the sampled noise: the same train step with
`guidance.mode = "sds"`, one particle and a large CFG; no eps_phi is built.
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()
  c.n_particles = 1
  c.guidance.mode = "sds"  # eps_phi -> sampled noise
  c.guidance.scale = 100.0  # DreamFusion's large CFG
  c.prior.kind = "stable_diffusion"
  c.prior.name = "stabilityai/stable-diffusion-2-1-base"  # hub id or local folder
  return c
