"""ProlificDreamer stage 1 (VSD, NeRF) on Stable Diffusion 2.1-base.

The published settings: prior SD 2.1-base (epsilon, CFG 7.5), eps_phi = LoRA
(rank 4) + camera MLP on SD 2.1 (v-prediction), 25k steps, renders 64 -> 512
at step 5000 with t_max 0.98 -> 0.5, Adam 1e-3 (grid 1e-2), AdamW 1e-4.
Needs the weights: pass a local diffusers folder when the machine is offline:

  python -m vsdjax.main --config experiments/vsd.py --workdir workdirs/burger \
      --config.prompt="a delicious hamburger" \
      --config.prior.name=/path/to/stable-diffusion-2-1-base \
      --config.eps_phi.base=/path/to/stable-diffusion-2-1   # or "prior" to share (less memory)
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()  # every default is ProlificDreamer stage 1
  c.n_particles = 1  # 4 particles: 4x the particle cost, eps_phi shared
  c.guidance.mode = "vsd"
  c.prior.kind = "stable_diffusion"
  c.prior.name = "stabilityai/stable-diffusion-2-1-base"  # hub id or local folder
  c.eps_phi.base = "stabilityai/stable-diffusion-2-1"  # "prior" shares the prior's UNet
  c.loss.sparsity = 10.0  # threestudio's sparsity weight (foggy results otherwise)
  return c
