"""ProlificDreamer stage 2 (geometry): a DMTet from a stage-1 run, refined by SDS on normal maps.

The published settings: SD 2.1-base at CFG 100, t in [0.02, 0.98] then
[0.02, 0.5] from step 5000, 512x512 normal maps, 15k steps, Adam 0.005 on
the sdf and the deformation, normal consistency and Laplacian smoothness
at 1e4 each; a Kuhn grid of 64 cells (the size of the reference "128" grid).

Where vsdjax differs from threestudio's prolificdreamer-geometry config: the
grid is a Kuhn split of cubes (threestudio loads a precomputed tet file);
the NeRF's (softplus) density 25 is the surface as there (threestudio's
isosurface_threshold), but the solid is made in
code (`mesh.close_holes`: openings of about 2 cells into a hollow NeRF are
sealed and cavities filled, small pieces dropped; threestudio removes small
components only), once at the start; no "auto" iso level and no tightening
of the grid to the object's box.

  python -m vsdjax.main --config experiments/vsd_geometry.py --workdir workdirs/burger_geometry \\
      --config.init_from=workdirs/burger --config.prompt="a delicious hamburger"
"""

from vsdjax import defaults


def get_config():
  c = defaults.get_config()
  c.representation = "dmtet"
  c.init_from = "workdirs/burger"  # the stage-1 run (n_particles comes from it)
  c.steps = 15_000
  c.guidance.mode = "sds"
  c.guidance.scale = 100.0
  c.guidance.front_threshold = 45.0  # threestudio's geometry config keeps the default 45
  c.guidance.back_threshold = 45.0
  c.prior.kind = "stable_diffusion"
  c.prior.name = "stabilityai/stable-diffusion-2-1-base"
  c.render.resolution = 512  # normal maps at 512 from the start
  c.render.resolution_after = 512
  c.optim.lr = 0.005
  c.mesh.grid_resolution = 64
  c.mesh.iso = 25.0
  c.mesh.normal_consistency = 10_000.0
  c.mesh.laplacian = 10_000.0
  return c
