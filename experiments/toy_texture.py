"""Stage 3 on the analytic prior: learn the texture of a toy_geometry.py run's meshes with VSD.

Each particle keeps its stage-2 mesh; its texture field starts from its
stage-1 NeRF (the chain toy.py -> toy_geometry.py -> toy_texture.py) and is
trained with VSD against the shaded references, as in toy.py. eval.json:
held-out RGB PSNR per particle (`psnr`, `nearest`), comparable with stage 1.

  python -m vsdjax.main --config experiments/toy_texture.py --workdir workdirs/toy_texture \\
      --config.init_from=workdirs/toy_geometry
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()
  c.representation = "textured_mesh"
  c.init_from = "workdirs/toy_geometry"  # the stage-2 run
  c.steps = 300
  c.prompt = ""

  c.prior.kind = "analytic"
  c.prior.references = "sphere:#d04040"
  c.prior.sigma_ref = 0.0

  c.guidance.scale = 1.0
  c.guidance.t_switch_step = 150
  c.guidance.view_prompts = False

  c.eps_phi.base = "tiny"  # as toy.py
  c.eps_phi.mode = "full"
  c.eps_phi.lr = 1e-3

  # The texture field is the stage-1 field: the same grid as toy.py.
  c.scene.n_levels = 8
  c.scene.log2_table_size = 14
  c.scene.per_level_scale = 1.5
  c.scene.hidden = 32
  c.scene.background = "white"
  c.scene.random_bg_prob = 0.0

  c.render.resolution = 32
  c.render.resolution_after = 32
  c.mesh.supersample = 2  # 2 x 2 texture lookups per pixel: at 32x32 one lookup per pixel
  # shows the grid's fine noise, which the NeRF's volume rendering averaged away
  c.optim.grid_lr = 1e-2
  c.optim.lr = 1e-3

  c.log_every = 25
  c.checkpoint_every = 100
  c.export.resolution = 64
  c.export.views = 4
  c.export.video_frames = 24
  c.export.texture_size = 256
  return c
