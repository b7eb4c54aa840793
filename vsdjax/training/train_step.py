"""The jitted SDS / VSD train step: both optimiser steps in one compiled call.

State (a plain dict; particles and their optimiser states carry a leading
particle axis [n, ...]):
  'step':         [] int32
  'particles':    the representation's init pytree per particle
  'particle_opt': Adam states of the particles
  'aux':          the representation's untrained state per particle (the NeRF's
                  occupancy grid); only when it has one, so that the runs without
                  keep the state layout (and checkpoints) they had before
  'phi':          eps_phi's trainable pytree (LoRA + camera MLP); {} for SDS
  'phi_opt':      its AdamW state

One step, for key k = fold_in(key, step):
  vmap over particles i: aux_i = update_aux(aux_i, theta_i) (before the
    particle update, so that this step renders with it);
  vmap over the n x V renders, V = views_per_step (view j of particle i):
    the representation's camera c_ij and render g(theta_i, c_ij), x0 = the
    prior's encoding (pixels; or the VAE after a bilinear resize to the
    prior's own image size, so that both UNets always see their native
    latents), t ~ U[t_min, t_max(step)], eps, x_t;
    eps_hat = CFG(prior, x_t, view-dependent prompt of c_ij);
    target = eps_phi(x_t, t, c_ij) (VSD; prompted without the view suffix, as in
    threestudio's VSD guidance) or eps (SDS); where eps_phi is LoRA on
    the prior's UNet, eps_hat's pair and the target are one batch-3 UNet call;
    grad = w(t) (eps_hat - target); loss = surrogate(x0, grad) + regularisers;
    theta_i's gradient is the mean over its views; Adam step of theta_i.
  eps_phi step (VSD): diffusion loss on stop_gradient(x0) of all n x V renders
    at a fresh t', camera dropout; AdamW step of phi.
The parts run under jax.named_scope ('update_aux', 'render', 'encode',
'guidance', 'eps_phi_update'), which names their operations in profiles
(benchmarks/train_step.py --profile).

The step is compiled for a device mesh (training/sharding.py): particle state
split over its 'particles' axis, each particle's views over 'views', the rest
replicated; on one device the mesh is 1 x 1.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vsdjax import cameras
from vsdjax.guidance import distill
from vsdjax.prior import schedule
from vsdjax.training import sharding


def particle_optimizer(config, representation) -> optax.GradientTransformation:
  """Adam of one particle: "grid" leaves at optim.grid_lr, the rest at optim.lr.

  AdamW (decoupled decay of every leaf by lr * optim.weight_decay a step, as
  threestudio's optimiser) when optim.weight_decay > 0; plain Adam, the
  official code's, keeps the optimiser state's layout of runs without it.
  """
  o = config.optim
  decay = o.weight_decay

  def adam(lr):
    if decay > 0:
      return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=decay)
    return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)

  return optax.multi_transform(
    {"grid": adam(o.grid_lr), "rest": adam(o.lr)}, representation.param_labels
  )


def phi_optimizer(config) -> optax.GradientTransformation:
  return optax.adamw(config.eps_phi.lr, weight_decay=config.eps_phi.weight_decay)


def init_state(config, models, frozen, key: jax.Array) -> dict:
  """The initial train state for `config` (see the module docstring)."""
  k_particles, k_phi = jax.random.split(key)
  keys = jax.random.split(k_particles, config.n_particles)
  data = frozen["representation"]
  init = models.representation.init
  particles = jax.vmap(lambda k, own: init(k, {"shared": data["shared"], "particle": own}))(
    keys, data["particle"]
  )
  # Copies: a particle that starts from its data must not share buffers with it (the step
  # donates the state, not the data).
  particles = jax.tree.map(jnp.copy, particles)
  phi = {}
  if models.eps_phi is not None:
    phi = models.eps_phi.init(k_phi, frozen["phi_base"])
  aux = jax.vmap(
    lambda p, own: models.representation.init_aux(p, {"shared": data["shared"], "particle": own})
  )(particles, data["particle"])
  state = {
    "step": jnp.zeros((), jnp.int32),
    "particles": particles,
    "particle_opt": jax.vmap(particle_optimizer(config, models.representation).init)(particles),
    "phi": phi,
    "phi_opt": phi_optimizer(config).init(phi),
  }
  if jax.tree.leaves(aux):
    state["aux"] = aux
  return state


def make_train_step(config, models, frozen, resolution: int, mesh=None) -> Callable:
  """Returns train_step(state, key) -> (state, metrics), jit-compiled once.

  `frozen` (models.build) is bound as a jit argument, not a constant. The state
  is donated. `resolution` is the render size this function compiles for; the
  trainer makes one per resolution of the schedule. `mesh` (sharding.make_mesh;
  default: the config's) sets where the state, frozen data and metrics live;
  the trainer puts them there first (sharding.put). The compiled function is
  `train_step.jitted` (its cache size counts compilations).
  """
  mesh = sharding.make_mesh(config) if mesh is None else mesh
  n, n_views = config.n_particles, config.views_per_step
  g = config.guidance
  rep, prior, phi_model = models.representation, models.prior, models.eps_phi
  p_opt, phi_opt = particle_optimizer(config, rep), phi_optimizer(config)
  num_t = prior.alphas_cumprod.shape[0]
  alphas_cumprod = jnp.asarray(prior.alphas_cumprod)

  def particle_loss(params, own, aux, key, phi, frozen, step, t_lo, t_hi):
    """One render of one particle: (loss, its parts for the metrics and eps_phi)."""
    k_cam, k_render, k_t, k_eps, k_encode = jax.random.split(key, 5)
    cam = rep.sample_camera(k_cam)
    data = {"shared": frozen["representation"]["shared"], "particle": own, "aux": aux}
    with jax.named_scope("render"):
      out = rep.render(params, data, cam, resolution, k_render)
    with jax.named_scope("encode"):  # [1, C, h, w]
      x0 = prior.encode(frozen["prior"], out["rgb"][None], k_encode)
    label = cameras.view_label(cam.elevation, cam.azimuth, g.front_threshold, g.back_threshold)
    cond = prior.condition(frozen["prior"], cam, label, x0.shape[-1])
    t = distill.sample_t(k_t, t_lo, t_hi, num_t, (1,))  # [1]
    a_t, s_t = schedule.coefficients(alphas_cumprod, t)
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = jax.lax.stop_gradient(schedule.add_noise(x0, eps, a_t, s_t))
    camera = cam.c2w.reshape(1, 16)
    phi_emb = frozen["phi_emb"][None]  # [1, L, D]: the prompt without its view
    with jax.named_scope("guidance"):
      if models.batch_with_prior:  # one UNet call: the prior's (uncond, cond) and eps_phi
        (eps_u, eps_c), target = phi_model.predict_eps_with_base(
          frozen["phi_base"], phi, x_t, t, phi_emb, camera, (cond["uncond"], cond["cond"])
        )
        eps_hat = schedule.cfg(eps_u, eps_c, g.scale)
      else:
        eps_hat = prior.eps_cfg(frozen["prior"], x_t, t, cond, g.scale)
        if phi_model is not None:  # VSD: eps_phi's estimate of the particles' own score
          target = phi_model.predict_eps(frozen["phi_base"], phi, x_t, t, phi_emb, camera)
        else:  # SDS: the sampled noise
          target = eps
    grad, n_nonfinite = distill.guidance_grad(
      jax.lax.stop_gradient(eps_hat),
      jax.lax.stop_gradient(target),
      distill.weight(a_t**2),
      g.grad_clip,
    )
    terms = {"guidance": distill.surrogate_loss(x0, grad), **rep.regularisers(out, step)}
    loss = sum(terms.values())
    aux = {
      "x0": jax.lax.stop_gradient(x0[0]),
      "camera": camera[0],
      "terms": terms,
      "t": t[0],
      "grad_norm": jnp.sqrt(jnp.sum(grad**2)),
      "nonfinite": n_nonfinite,
      "render_metrics": out.get("metrics", {}),
    }
    return loss, aux

  def step_fn(state, key, frozen):
    step = state["step"]
    key = jax.random.fold_in(key, step)
    k_particles, k_phi = jax.random.split(key)
    t_lo, t_hi = distill.t_bounds(
      step,
      t_min=g.t_min,
      t_max=g.t_max,
      t_max_after=g.t_max_after,
      t_switch_step=g.t_switch_step,
      t_anneal_steps=g.t_anneal_steps,
    )
    keys = jax.random.split(k_particles, n)  # [n, 2]
    if n_views > 1:  # [n V, 2]: view j of particle i at i V + j
      keys = jax.vmap(lambda k: jax.random.split(k, n_views))(keys)
      keys = keys.reshape((n * n_views,) + keys.shape[2:])
    keys = jax.lax.with_sharding_constraint(keys, sharding.by_render(mesh))
    shared = frozen["representation"]["shared"]
    with jax.named_scope("update_aux"):  # e.g. the occupancy grid
      rep_aux = jax.vmap(
        lambda a, p, own, k: rep.update_aux(a, p, {"shared": shared, "particle": own}, step, k)
      )(
        state.get("aux", {}),
        state["particles"],
        frozen["representation"]["particle"],
        jax.random.split(jax.random.fold_in(key, 7), n),
      )
    # Each particle's arrays once per view ([n, ...] -> [n V, ...]); the particle's gradient
    # is the mean of its views'. (Not a vmap over views inside the particle's gradient: that
    # program crashes XLA:CPU's YNN transpose in jaxlib 0.10.2.)
    per_render = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, n_views, axis=0), tree)
    over_views = lambda tree: jax.tree.map(
      lambda x: jnp.mean(x.reshape((n, n_views) + x.shape[1:]), axis=1), tree
    )
    if n_views == 1:
      per_render = over_views = lambda tree: tree
    grad_fn = jax.value_and_grad(particle_loss, has_aux=True)
    (loss, aux), grads = jax.vmap(grad_fn, in_axes=(0, 0, 0, 0, None, None, None, None, None))(
      per_render(state["particles"]),
      per_render(frozen["representation"]["particle"]),
      per_render(rep_aux),
      keys,
      state["phi"],
      frozen,
      step,
      t_lo,
      t_hi,
    )
    loss, grads = over_views((loss, grads))  # [n], [n, ...]
    updates, particle_opt = jax.vmap(p_opt.update)(grads, state["particle_opt"], state["particles"])
    particles = jax.vmap(optax.apply_updates)(state["particles"], updates)
    metrics = {
      "loss": jnp.mean(loss),
      "t": jnp.mean(aux["t"]),
      "t_max": t_hi,
      "guidance_grad_norm": jnp.mean(aux["grad_norm"]),
      "guidance_nonfinite": jnp.sum(aux["nonfinite"]),
    }
    for name, tree in (("particle_grad_norm", grads), ("particle_update_norm", updates)):
      norms = jax.vmap(optax.tree.norm)(tree)  # [n]
      metrics.update(
        {name: jnp.mean(norms), f"{name}_min": jnp.min(norms), f"{name}_max": jnp.max(norms)}
      )
    metrics.update({f"loss_{k}": jnp.mean(v) for k, v in aux["terms"].items()})
    metrics.update({k: jnp.mean(v) for k, v in aux["render_metrics"].items()})
    metrics.update(rep.step_metrics(particles))
    phi, phi_state = state["phi"], state["phi_opt"]
    if phi_model is not None:
      emb = jnp.broadcast_to(frozen["phi_emb"], (n * n_views,) + frozen["phi_emb"].shape)
      phi_loss_fn = functools.partial(phi_model.loss, frozen["phi_base"])
      for i in range(config.eps_phi.steps_per_step):
        with jax.named_scope("eps_phi_update"):
          (phi_loss, _), phi_grads = jax.value_and_grad(phi_loss_fn, has_aux=True)(
            phi, aux["x0"], emb, aux["camera"], jax.random.fold_in(k_phi, i)
          )
        phi_updates, phi_state = phi_opt.update(phi_grads, phi_state, phi)
        phi = optax.apply_updates(phi, phi_updates)
      metrics.update(phi_loss=phi_loss, phi_grad_norm=optax.tree.norm(phi_grads))
    new_state = {
      "step": step + 1,
      "particles": particles,
      "particle_opt": particle_opt,
      "phi": phi,
      "phi_opt": phi_state,
    }
    if "aux" in state:
      new_state["aux"] = rep_aux
    return new_state, metrics

  state_shapes = jax.eval_shape(
    lambda f: init_state(config, models, f, jax.random.PRNGKey(0)), frozen
  )
  state_sh = sharding.state_shardings(mesh, state_shapes)
  replicated = sharding.replicated(mesh)
  frozen_sh = sharding.frozen_shardings(mesh, frozen)
  jitted = jax.jit(
    step_fn,
    donate_argnums=0,
    in_shardings=(state_sh, replicated, frozen_sh),
    out_shardings=(state_sh, replicated),
  )
  frozen = sharding.put(frozen, frozen_sh)

  def train_step(state, key):
    # Inputs placed elsewhere (a state from init_state) would compile a second program.
    return jitted(sharding.put(state, state_sh), sharding.put(key, replicated), frozen)

  train_step.jitted = jitted
  return train_step
