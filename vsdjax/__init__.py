"""vsdjax: ProlificDreamer (VSD) and DreamFusion (SDS) text-to-3D in pure JAX.

Packages, from what is trained to how:
  representations   what a particle is: the Representation interface, nerf/
                    (hash grid, field, background, volume renderer, exports)
                    and image (the paper's 2D experiment)
  prior             what it is distilled from: the Prior interface, Stable
                    Diffusion (Flax, safetensors) and analytic/ (an exact
                    Gaussian-mixture prior over reference shapes, evaluation)
  guidance          the SDS / VSD update and eps_phi (LoRA + camera MLP)
  training          config -> models, the train state and jitted step, the
                    work directory
Modules: cameras, mlp, checks (argument and config checks), console,
defaults (the config), train (the loop), main (the CLI).
"""
