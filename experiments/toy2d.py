"""The paper's 2D experiment on the analytic prior: particles are images.

The render is the identity (a particle is an image in x0 units, [3, h, w]) and
the camera is fixed. With one Gaussian reference (sigma_ref > 0), VSD particles
should spread like the prior (per-pixel std ~ sigma_ref) while SDS collapses to
the mean (std ~ 0); DIR/final/eval.json reports "spread" and "sigma_ref".

  python -m vsdjax.main --config experiments/toy2d.py --workdir workdirs/toy2d
  ... --config.guidance.mode=sds   # the mode-seeking baseline
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()
  c.representation = "image"  # particles are images; no NeRF, one fixed camera
  c.steps = 500
  c.n_particles = 8
  c.prompt = ""  # all references

  c.prior.kind = "analytic"
  c.prior.references = "sphere:#d04040"  # the mean image: a sphere from the fixed camera
  c.prior.sigma_ref = 0.1  # std of the Gaussian around it (x0 units)

  c.guidance.scale = 1.0  # no CFG: sample the prior itself
  c.guidance.t_switch_step = 10**9  # keep t in [0.02, 0.98]
  c.guidance.view_prompts = False

  c.eps_phi.base = "tiny"  # small pixel-space UNet from scratch
  c.eps_phi.mode = "full"
  c.eps_phi.lr = 1e-3
  c.eps_phi.camera_dropout = 0.0  # one fixed camera

  c.render.resolution = 16  # image size
  c.render.resolution_after = 16
  c.optim.lr = 1e-2  # Adam on the pixels

  c.log_every = 25
  c.checkpoint_every = 250
  return c
