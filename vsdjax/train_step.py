"""The jitted SDS / VSD train step: both optimiser steps in one compiled call.

State (a plain dict; particles and their optimiser states carry a leading
particle axis [n, ...]):
  'step':         [] int32
  'particles':    3D: scene.init pytree per particle; 2D: {'image': [3, h, w]} (x0)
  'particle_opt': Adam states of the particles
  'phi':          eps_phi's trainable pytree (LoRA + camera MLP); {} for SDS
  'phi_opt':      its AdamW state

One step, for key k = fold_in(key, step):
  vmap over particles i: sample camera c_i (3D), render g(theta_i, c_i),
    x0 = encode (pixels; or the VAE after a bilinear resize of the render to
    the prior's own image size, 512 for SD 2.1-base, so that both UNets always
    see their native latents), t ~ U[t_min, t_max(step)], eps, x_t;
    eps_hat = CFG(prior, x_t, view-dependent prompt of c_i);
    target = eps_phi(x_t, t, c_i) (VSD) or eps (SDS);
    grad = w(t) (eps_hat - target); loss = surrogate(x0, grad) + regularisers;
    Adam step of theta_i.
  eps_phi step (VSD): diffusion loss on stop_gradient(x0) of all particles at a
    fresh t', camera dropout; AdamW step of phi.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vsdjax import cameras, distill, eps_phi, render, scene, shapes
from vsdjax import prior as priors
from vsdjax.prior import analytic, schedule
from vsdjax.prior import stable_diffusion as sd_lib

# A fixed camera for the 2D mode: the analytic references are rendered from it
# and eps_phi is conditioned on it.
_CAMERA_2D = dict(radius=1.3, elevation=15.0, azimuth=30.0, fovy=50.0)


def camera_2d() -> cameras.Cameras:
  """The fixed camera of the 2D mode (one camera, shape [])."""
  return cameras.from_spherical(**_CAMERA_2D)


def particle_optimizer(config) -> optax.GradientTransformation:
  """Adam of one particle: grid tables at optim.grid_lr, the rest at optim.lr."""
  o = config.optim

  def adam(lr):
    return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)

  def labels(params):
    lab = jax.tree.map(lambda _: "rest", params)
    if "field" in params:
      lab["field"]["grid"] = jax.tree.map(lambda _: "grid", params["field"]["grid"])
    return lab

  return optax.multi_transform({"grid": adam(o.grid_lr), "rest": adam(o.lr)}, labels)


def phi_optimizer(config) -> optax.GradientTransformation:
  return optax.adamw(config.eps_phi.lr, weight_decay=config.eps_phi.weight_decay)


def init_state(config, models, frozen, key: jax.Array) -> dict:
  """The initial train state for `config` (see the module docstring)."""
  n = config.n_particles
  k_particles, k_phi = jax.random.split(key)
  keys = jax.random.split(k_particles, n)
  if config.dimension == 3:
    spec = scene.spec_from_config(config)
    particles = jax.vmap(lambda k: scene.init(k, spec))(keys)
  elif config.dimension == 2:
    size = config.render.resolution
    particles = {"image": 0.5 * jax.vmap(lambda k: jax.random.normal(k, (3, size, size)))(keys)}
  else:
    raise ValueError(f"dimension must be 2 or 3, got {config.dimension!r}")
  phi = {}
  if models.phi_spec is not None:
    phi = eps_phi.init(k_phi, models.phi_spec, models.phi_unet, frozen["phi_base"])
  return {
      "step": jnp.zeros((), jnp.int32),
      "particles": particles,
      "particle_opt": jax.vmap(particle_optimizer(config).init)(particles),
      "phi": phi,
      "phi_opt": phi_optimizer(config).init(phi),
  }


def reference_means(models, c2w, fovy, size):
  """Analytic prior means at one camera: [1, K, 3, size, size]."""
  rgb = shapes.render_views(models.references, c2w, fovy, size, size)["rgb"]  # [K, H, W, 3]
  return analytic.encode_images(models.prior, rgb)[None]


def make_train_step(config, models, frozen, resolution: int) -> Callable:
  """Returns train_step(state, key) -> (state, metrics), jit-compiled once.

  `frozen` (models.build) is bound as a jit argument, not a constant. The state
  is donated. `resolution` is the render size (3D) this function compiles for;
  the trainer makes one per resolution of the schedule. The compiled function
  is `train_step.jitted` (its cache size counts compilations).
  """
  g = config.guidance
  vsd = g.mode == "vsd"
  spec = scene.spec_from_config(config) if config.dimension == 3 else None
  ranges = scene.camera_ranges_from_config(config)
  p_opt, phi_opt = particle_optimizer(config), phi_optimizer(config)
  prior = models.prior
  num_t = prior.alphas_cumprod.shape[0]
  loss_w = config.loss
  # Ray batches only when the image has more rays than one batch (lax.map of a
  # single batch costs memory for nothing).
  ray_batch = config.render.ray_batch
  ray_batch = ray_batch if 0 < ray_batch < resolution * resolution else None

  def encode(frozen, rgb):  # [1, H, W, 3] -> [1, C, h, w]
    if models.is_analytic:
      return analytic.encode_images(prior, rgb)
    rgb = sd_lib.resize_images(rgb, sd_lib.image_size(prior))  # [1, 512, 512, 3]
    return sd_lib.encode_images(frozen["prior"], rgb)

  def prior_eps(frozen, x_t, t, label, means):
    cond, uncond = frozen["emb_cond"][label][None], frozen["emb_uncond"][None]
    model = prior if models.is_analytic else frozen["prior"]
    params = means if models.is_analytic else model.unet_params
    return priors.predict_eps_cfg(model, params, x_t, t, cond, uncond, g.scale)

  def particle_loss(params, key, phi, frozen, t_lo, t_hi):
    k_cam, k_render, k_t, k_eps = jax.random.split(key, 4)
    if config.dimension == 3:
      cam = jax.tree.map(lambda v: v[0], cameras.sample(k_cam, ranges, 1))
      out = scene.render_camera(params, cam.c2w, cam.fovy, resolution, resolution, spec,
                                k_render, ray_batch)
      x0 = encode(frozen, out["rgb"][None])  # [1, C, h, w]
    else:
      cam = camera_2d()
      out = None
      x0 = params["image"][None]  # [1, 3, h, w]
    label = cameras.view_label(cam.elevation, cam.azimuth)
    means = (reference_means(models, cam.c2w, cam.fovy, x0.shape[-1])
             if models.is_analytic else None)
    t = distill.sample_t(k_t, t_lo, t_hi, num_t, (1,))  # [1]
    a_t, s_t = schedule.coefficients(prior.alphas_cumprod, t)
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = jax.lax.stop_gradient(schedule.add_noise(x0, eps, a_t, s_t))
    eps_hat = prior_eps(frozen, x_t, t, label, means)
    camera = cam.c2w.reshape(1, 16)
    if vsd:
      target = eps_phi.predict_eps(models.phi_spec, models.phi_unet, frozen["phi_base"],
                                   phi, x_t, t, frozen["phi_emb"][label][None], camera,
                                   models.phi_alphas_cumprod, models.phi_prediction_type)
    else:
      target = eps
    grad, n_nonfinite = distill.guidance_grad(jax.lax.stop_gradient(eps_hat),
                                              jax.lax.stop_gradient(target),
                                              distill.weight(a_t**2), g.grad_clip)
    terms = {"guidance": distill.surrogate_loss(x0, grad)}
    if out is not None:
      flat = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), out)
      for name, fn in (("sparsity", render.opacity_sparsity), ("opaque", render.opaque),
                       ("entropy", render.entropy), ("orientation", render.orientation)):
        if loss_w[name] > 0:
          terms[name] = loss_w[name] * fn(flat)
    loss = sum(terms.values())
    aux = {"x0": jax.lax.stop_gradient(x0[0]), "camera": camera[0], "label": label,
           "terms": terms, "t": t[0], "grad_norm": jnp.sqrt(jnp.sum(grad**2)),
           "nonfinite": n_nonfinite}
    return loss, aux

  def step_fn(state, key, frozen):
    step = state["step"]
    key = jax.random.fold_in(key, step)
    k_particles, k_phi = jax.random.split(key)
    t_lo, t_hi = distill.t_bounds(
        step, t_min=g.t_min, t_max=g.t_max, t_max_after=g.t_max_after,
        t_switch_step=g.t_switch_step, t_anneal_steps=g.t_anneal_steps)
    keys = jax.random.split(k_particles, config.n_particles)
    grad_fn = jax.value_and_grad(particle_loss, has_aux=True)
    (loss, aux), grads = jax.vmap(grad_fn, in_axes=(0, 0, None, None, None, None))(
        state["particles"], keys, state["phi"], frozen, t_lo, t_hi)
    updates, particle_opt = jax.vmap(p_opt.update)(grads, state["particle_opt"],
                                                   state["particles"])
    particles = jax.vmap(optax.apply_updates)(state["particles"], updates)
    metrics = {"loss": jnp.mean(loss), "t": jnp.mean(aux["t"]), "t_max": t_hi,
               "guidance_grad_norm": jnp.mean(aux["grad_norm"]),
               "guidance_nonfinite": jnp.sum(aux["nonfinite"])}
    for name, tree in (("particle_grad_norm", grads), ("particle_update_norm", updates)):
      norms = jax.vmap(optax.global_norm)(tree)  # [n]
      metrics.update({name: jnp.mean(norms), f"{name}_min": jnp.min(norms),
                      f"{name}_max": jnp.max(norms)})
    metrics.update({f"loss_{k}": jnp.mean(v) for k, v in aux["terms"].items()})
    if config.dimension == 2:  # Per-pixel std across particles (eval.json's "spread").
      metrics["particle_spread"] = jnp.mean(jnp.std(particles["image"], axis=0))
    phi, phi_state = state["phi"], state["phi_opt"]
    if vsd:
      emb = frozen["phi_emb"][aux["label"]]  # [n, L, D]
      phi_loss_fn = functools.partial(
          eps_phi.loss, models.phi_spec, models.phi_unet, frozen["phi_base"])
      for i in range(config.eps_phi.steps_per_step):
        (phi_loss, _), phi_grads = jax.value_and_grad(phi_loss_fn, has_aux=True)(
            phi, aux["x0"], emb, aux["camera"], models.phi_alphas_cumprod,
            models.phi_prediction_type, jax.random.fold_in(k_phi, i))
        phi_updates, phi_state = phi_opt.update(phi_grads, phi_state, phi)
        phi = optax.apply_updates(phi, phi_updates)
      metrics.update(phi_loss=phi_loss, phi_grad_norm=optax.global_norm(phi_grads))
    new_state = {"step": step + 1, "particles": particles, "particle_opt": particle_opt,
                 "phi": phi, "phi_opt": phi_state}
    return new_state, metrics

  jitted = jax.jit(step_fn, donate_argnums=0)

  def train_step(state, key):
    return jitted(state, key, frozen)

  train_step.jitted = jitted
  return train_step
