"""ProlificDreamer stage 3 (texture): VSD on the fixed stage-2 mesh.

The published settings: VSD with SD 2.1-base (CFG 7.5) and eps_phi = LoRA on
SD 2.1, 512x512, 30k steps; the texture field (hash grid + MLP) starts from
the stage-1 NeRF's albedo, as in the official code (mesh.texture_from_nerf;
threestudio starts it afresh) (grid lr 0.01, MLP and background 1e-3, LoRA
1e-4); cameras as in stage 1 (fovy [40, 70], elevation [-10, 45]), "front" /
"back" view prompts within 30 degrees, and the background MLP without random
solid colours (threestudio's prolificdreamer-texture config).

  python -m vsdjax.main --config experiments/vsd_texture.py --workdir workdirs/burger_texture \\
      --config.init_from=workdirs/burger_geometry --config.prompt="a delicious hamburger"
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()
  c.representation = "textured_mesh"
  c.init_from = "workdirs/burger_geometry"  # the stage-2 run
  c.steps = 30_000
  c.guidance.mode = "vsd"
  c.prior.kind = "stable_diffusion"
  c.prior.name = "stabilityai/stable-diffusion-2-1-base"
  c.eps_phi.base = "stabilityai/stable-diffusion-2-1"
  c.render.resolution = 512
  c.render.resolution_after = 512
  c.scene.random_bg_prob = 0.0  # threestudio's texture background has no random_aug
  c.optim.grid_lr = 0.01
  c.optim.lr = 1e-3
  return c
