"""vsdjax: ProlificDreamer (VSD) and DreamFusion (SDS) text-to-3D in pure JAX.

Modules, from the scene to the trainer:
  hashgrid, mlp, field, background  the NeRF of one particle
  cameras, render, shapes           cameras, the lax.scan volume renderer, exact
                                    procedural reference scenes
  prior                             frozen score models: Stable Diffusion (Flax)
                                    and the analytic Gaussian-mixture prior
  lora, eps_phi                     VSD's camera-conditioned LoRA noise predictor
  distill, train_step               the SDS/VSD update and the jitted step
  train, export, evaluate, main     the trainer, exports and the CLI
"""
