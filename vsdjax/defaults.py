"""The base configuration every experiment in experiments/ derives from.

Each field is commented. Experiment files call `get_config()` and override what
they change; the command line overrides further (`--config.steps=100`).
Defaults are the published ProlificDreamer stage-1 settings, so
`experiments/vsd.py` changes little.
"""

import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed; same seed + config -> same result
  c.steps = 25_000  # optimisation steps (stage 1, NeRF)
  c.n_particles = 1  # VSD particles (n); SDS uses 1
  c.views_per_step = 1  # cameras each particle renders per step (V); its loss and eps_phi's
  # training batch take all n x V renders (the reference implementations' batch of views)
  c.mode = "train"  # "train" (train, then export) or "export" (export the latest checkpoint)
  c.representation = "nerf"  # what a particle is: "nerf" (hash-grid NeRF, stage 1), "dmtet"
  # (stage 2 geometry), "textured_mesh" (stage 3 texture) or "image" (the paper's 2D
  # experiment); vsdjax/representations/
  c.init_from = ""  # stages 2-3: the previous stage's work directory (n_particles comes from it)
  c.prompt = "a hamburger"  # text prompt; analytic prior: "" = every reference, "a red sphere"
  # selects references by colour and shape (mixture.encode_prompts)

  # --- guidance: the particle update (SDS / VSD, vsdjax/guidance/distill.py) ---
  c.guidance = ml_collections.ConfigDict()
  c.guidance.mode = "vsd"  # "vsd" (eps_phi) or "sds" (eps_phi replaced by the sampled noise)
  c.guidance.scale = 7.5  # CFG of the pretrained branch (VSD 7.5; SDS ~100)
  c.guidance.t_min = 0.02  # t ~ U[t_min, t_max] (fractions of the 1000 steps)
  c.guidance.t_max = 0.98
  c.guidance.t_max_after = 0.5  # t_max after `t_switch_step`
  c.guidance.t_switch_step = 5_000  # hard switch of t_max (ProlificDreamer, threestudio)
  c.guidance.t_anneal_steps = 0  # >0: anneal t_max linearly over this many steps
  # ending at t_switch_step instead of the hard switch
  c.guidance.grad_clip = 0.0  # >0: clamp each entry of the SDS / VSD gradient (in x0 space)
  # to [-grad_clip, grad_clip], as both references do (both leave it off)
  c.guidance.view_prompts = True  # append ", front/side/back/overhead view" by camera
  c.guidance.front_threshold = 30.0  # "front" if |azimuth| < this (degrees; threestudio's
  # ProlificDreamer stages 1 and 3; its stage 2 keeps the prompt processor's default 45)
  c.guidance.back_threshold = 30.0  # "back" if |azimuth| > 180 - this

  # --- prior: the frozen pretrained score model ---
  c.prior = ml_collections.ConfigDict()
  c.prior.kind = "stable_diffusion"  # "stable_diffusion" or "analytic"
  c.prior.name = "stabilityai/stable-diffusion-2-1-base"  # hub id or local diffusers folder
  c.prior.dtype = "auto"  # the frozen UNet / VAE: "float32", "bfloat16", or "auto" = bfloat16 on
  # a TPU or GPU, float32 on the CPU and on GPUs without bfloat16 dots (compute capability < 8,
  # a T4) (per kind of device: a run resumed on another switches; set it explicitly to pin
  # it). Trainable state stays float32; bfloat16's error: benchmarks/README.md "precision.py"
  c.prior.attention = "fused"  # the UNets' attention (prior and eps_phi): "fused"
  # (jax.nn.dot_product_attention, cuDNN on a GPU in bfloat16, XLA elsewhere), "xla" or
  # "diffusers" (diffusers' own einsums); stable_diffusion.intercept_attention
  c.prior.references = "sphere:#d04040"  # analytic: "shape:#rrggbb,..." components (shapes.py)
  c.prior.sigma_ref = 0.0  # analytic: std of each component around its reference (x0 units)
  c.prior.reference_size = 32  # analytic: render size of the references (= render size)
  c.prior.reference_render = "rgb"  # analytic: "rgb" (shaded references) or "normal" (their
  # normal maps, (n + 1) / 2 on black: the geometry stage's target)

  # --- eps_phi: the camera-conditioned LoRA noise predictor (VSD only) ---
  c.eps_phi = ml_collections.ConfigDict()
  c.eps_phi.base = "stabilityai/stable-diffusion-2-1"  # base model; "prior" shares the prior's UNet
  # (less memory); "tiny" = small UNet from scratch (analytic prior)
  c.eps_phi.mode = "lora"  # "lora" (frozen base + LoRA) or "full" (all weights train)
  c.eps_phi.rank = 4  # LoRA rank r
  c.eps_phi.alpha = 4.0  # LoRA scale alpha / r
  c.eps_phi.lr = 1e-4  # AdamW learning rate
  c.eps_phi.weight_decay = 0.01  # AdamW weight decay (torch's AdamW default, which both
  # reference implementations keep)
  c.eps_phi.camera_dropout = 0.1  # probability the camera is replaced by zeros
  c.eps_phi.steps_per_step = 1  # eps_phi updates per particle update
  c.eps_phi.tiny_channels = (64, 64)  # "tiny" base: UNet level widths (>= 64, multiples of 32)
  c.eps_phi.batch_with_prior = True  # base "prior", mode "lora": the prior's CFG pair and
  # eps_phi's target in one UNet call of batch 3 (False: two calls, batch 2 and 1)

  # --- scene: one NeRF per particle (field.py, hashgrid.py, background.py) ---
  c.scene = ml_collections.ConfigDict()
  c.scene.bound = 1.0  # scene is the cube [-bound, bound]^3
  c.scene.n_levels = 16  # hash grid levels L
  c.scene.n_features = 2  # features per level F
  c.scene.log2_table_size = 19  # table size T = 2^19
  c.scene.base_resolution = 16  # coarsest grid resolution
  c.scene.per_level_scale = 1.447269  # growth per level (threestudio)
  c.scene.hidden = 64  # MLP width of the density / albedo heads
  c.scene.density_activation = "softplus"  # "softplus" (both reference implementations) or
  # "trunc_exp" (Instant-NGP's exp; densities grow faster, so iso-levels mean other surfaces)
  c.scene.blob_density = 10.0  # density bias at the centre (ProlificDreamer "blob")
  c.scene.blob_radius = 0.5  # radius where the blob bias reaches 0
  c.scene.albedo_init_std = 0.0  # >0: each particle starts in a random colour (std of raw albedo)
  c.scene.shading = "albedo"  # "albedo", "diffuse" (random point light) or "textureless"
  c.scene.background = "mlp"  # "mlp" (view-direction MLP) or "white"
  c.scene.random_bg_prob = 0.5  # probability of a random solid background colour per render

  # --- mesh: stages 2-3 (vsdjax/representations/mesh/) ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.grid_resolution = 64  # Kuhn tet grid cells per axis (64: 275k vertices, 1.6M tets,
  # the size of the reference "128" grid)
  c.mesh.max_faces = 0  # marching-tets face budget; 0: 64 * grid_resolution^2
  c.mesh.iso = 25.0  # NeRF density that becomes the surface when starting from stage 1
  # (threestudio's isosurface_threshold, which its ProlificDreamer stage 2 keeps)
  c.mesh.fit_box = True  # starting from stage 1: the grid spans the NeRF surface's box, not
  # the scene cube (threestudio's coarse-to-fine isosurface; finer cells on the object)
  c.mesh.box_margin = 0.1  # that box widened by this fraction of its size on each side
  c.mesh.close_holes = 1  # fill cavities reached through openings < ~2k cells (k; 0: off)
  c.mesh.init_shape = "sphere"  # without init_from: the analytic shape the sdf starts from
  c.mesh.normal_consistency = 10_000.0  # weight of 1 - cos between vertex normals along edges
  c.mesh.laplacian = 10_000.0  # weight of the uniform Laplacian smoothness
  c.mesh.supersample = 1  # texture stage: s x s texture lookups per pixel, averaged
  c.mesh.texture_from_nerf = True  # texture stage: start the texture field and background
  # from the stage-1 NeRF's (the official code); False: afresh (threestudio)
  c.mesh.outlier_faces = 0.01  # texture stage: drop mesh pieces with fewer faces than this
  # fraction of the largest's (threestudio's isosurface_outlier_n_faces_threshold; 0: keep
  # all; 1: the largest only)

  # --- render ---
  c.render = ml_collections.ConfigDict()
  c.render.resolution = 64  # render size before `resolution_step`
  c.render.resolution_after = 512  # render size from `resolution_step` on
  c.render.resolution_step = 5_000  # step of the resolution switch (one recompilation)
  c.render.n_samples = 64  # samples per ray
  c.render.chunk = 16  # samples per lax.scan step (rematerialised)
  # Empty-space skipping (nerf): an occupancy grid of G^3 cells per particle (0: off); the
  # n_samples of a ray are spread over its occupied cells only, in training renders, exports and
  # eval.json (the grid is part of the scene, as in threestudio). Cells are occupied while
  # the moving maximum (decay per update, updated every `occupancy_every` steps) of their
  # opacity over one cell exceeds occupancy_threshold (or the grid's mean, if lower).
  c.render.occupancy_grid = 32  # threestudio's grid; with it fewer samples give the same spacing
  c.render.occupancy_threshold = 0.01
  c.render.occupancy_decay = 0.95
  c.render.occupancy_every = 16
  c.render.ray_batch = 32_768  # >0: render in batches of this many rays (lax.map);
  # bounds memory at 512x512 (benchmarks/README.md); 0: one batch

  # --- cameras (degrees, world units; cameras.py) ---
  c.camera = ml_collections.ConfigDict()
  c.camera.radius = (1.0, 1.5)
  c.camera.elevation = (-10.0, 45.0)
  c.camera.azimuth = (-180.0, 180.0)
  c.camera.fovy = (40.0, 70.0)
  c.camera.sphere_prob = 0.5  # probability that an elevation is uniform on the sphere, not in
  # degrees (threestudio's random cameras; the official code also draws half on a sphere)

  # --- particle optimiser (Adam) ---
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3  # MLPs and background
  c.optim.grid_lr = 1e-2  # hash grid tables
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-15
  c.optim.weight_decay = 0.0  # >0: AdamW, each leaf decays by lr * weight_decay a step
  # (threestudio's AdamW: 0.01; the official code's Adam: 0)

  # --- regularisers (weights; 0 disables) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.sparsity = 10.0  # mean opacity sparsity (threestudio)
  c.loss.opaque = 1000.0  # binary entropy of opacity, from `opaque_step` on
  c.loss.opaque_step = 10_000  # threestudio's opaque weight: 0, then 1000 from step 10k on
  c.loss.entropy = 0.0  # entropy of the ray weights (ProlificDreamer official)
  c.loss.orientation = 0.0  # DreamFusion orientation loss (needs normals)

  # --- devices: a mesh of particles x views over all devices (training/sharding.py) ---
  c.sharding = ml_collections.ConfigDict()
  c.sharding.particles = 0  # devices the particles are split over; 0: gcd(n_particles, devices)
  c.sharding.views = 0  # devices each particle's views are split over; 0: as many of the
  # remaining devices as divide views_per_step

  # --- logging, checkpoints, export ---
  c.log_every = 50  # metrics.jsonl interval (steps)
  c.preview_every = 100  # DIR/previews/<step>.png and TensorBoard: every particle from fixed
  # cameras (training/previews.py; 0: off). experiments/toy.py on a 2-core CPU: 0.69 s a
  # preview against 0.42 s a step (+1.7% at 100)
  c.checkpoint_every = 1_000  # orbax checkpoint interval (steps)
  c.keep_checkpoints = 2  # checkpoints kept
  # JAX's persistent compilation cache: a rerun or resume reads its compiled steps from this
  # folder instead of compiling again; "" leaves JAX's own settings (by default no cache)
  c.compile_cache = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vsdjax", "jax"
  )
  c.export = ml_collections.ConfigDict()
  c.export.views = 8  # PNG views per particle
  c.export.video_frames = 60  # frames of the 360-degree orbit video
  c.export.resolution = 256  # export render size
  c.export.mesh_resolution = 128  # marching-cubes grid
  c.export.mesh_threshold = 25.0  # density iso-level (threestudio's default; lower it if
  # the mesh has holes, raise it if it is extruded)
  c.export.mesh_outlier_faces = 0.01  # drop pieces with fewer faces than this fraction of the
  # largest's, as threestudio's NeRF exports do (0: keep all)
  c.export.eval_views = 8  # analytic prior: held-out cameras for eval.json
  c.export.texture_size = 1024  # texture stage: UV atlas size of texture.png
  return c
