"""Mixed precision (prior.dtype) and the work the train step does with the frozen networks.

bfloat16 keeps 8 significant bits (a rounding error of up to 2^-8 = 0.4 % per
operation); through the tiny UNet the eps prediction moves by 1.5 to 2.4 %
(relative L2, worst of 20 draws in benchmarks/precision.py), the VAE latents
by 1.7 to 1.9 %. The tolerance below (4 %) leaves 1.7x the worst.

The step's program is read as a jaxpr: diffusers' UNet and VAE are the only
convolutions in it (NeRF, hash grid, LoRA and camera MLP are dense), so
counting `conv_general_dilated` equations tells which of their passes it
makes. A weight gradient is one more convolution per frozen convolution.
"""

import dataclasses

import jax
from jax.extend.source_info_util import summarize
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vsd
from helpers import eqns, get
from tiny_sd import tiny_sd, tiny_sd_dir  # noqa: F401 (fixtures)
from vsdjax import checks, prior as prior_lib
from vsdjax.guidance import lora as lora_lib
from vsdjax.prior import stable_diffusion as sd_lib
from vsdjax.training import models, train_step

TOLERANCE = 0.04  # relative L2 of bfloat16 against float32 (measured worst: 2.4 %)


def _rel_l2(reference, approx) -> float:
  reference, approx = np.asarray(reference, np.float64), np.asarray(approx, np.float64)
  return float(np.linalg.norm(approx - reference) / np.linalg.norm(reference))


def _convs(fn, *args) -> int:
  """Convolutions in the jaxpr of fn(*args)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return sum(eqn.primitive.name == "conv_general_dilated" for eqn in eqns(jaxpr))


@pytest.fixture(scope="module")
def bf16_step(tiny_sd_dir):
  """experiments/vsd.py on the tiny SD in bfloat16 (one particle, eps_phi = LoRA on the
  prior's UNet): (models, frozen, state, the step's closed jaxpr, its output state)."""
  c = vsd.get_config()
  c.prior.name, c.prior.dtype, c.eps_phi.base = tiny_sd_dir, "bfloat16", "prior"
  c.scene.n_levels, c.scene.log2_table_size, c.scene.hidden = 2, 8, 8
  c.render.resolution, c.render.n_samples, c.render.chunk = 64, 8, 8
  checks.validate_config(c)
  m, frozen = models.build(c, jax.random.PRNGKey(0))
  state = train_step.init_state(c, m, frozen, jax.random.PRNGKey(1))
  step = train_step.make_train_step(c, m, frozen, c.render.resolution)
  closed, (out_state, _) = jax.make_jaxpr(step.jitted, return_shape=True)(
    state, jax.random.PRNGKey(2), frozen
  )
  return m, frozen, state, closed, out_state


@pytest.mark.torch
def test_bfloat16_tiny_sd_is_close_to_float32(tiny_sd_dir):
  f32 = prior_lib.load_stable_diffusion(tiny_sd_dir, jnp.float32)
  bf16 = prior_lib.load_stable_diffusion(tiny_sd_dir, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(bf16.unet_params)} == {jnp.dtype(jnp.bfloat16)}
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x_t = jax.random.normal(keys[0], (2, 4, 16, 16))  # [B, 4, h, w]
  t = jnp.array([100, 700])
  emb = prior_lib.encode_prompts(f32, ["a red chair", ""])  # [2, 77, 32]
  cond, uncond = emb[:1].repeat(2, 0), emb[1:].repeat(2, 0)
  eps_fn = jax.jit(
    lambda sd: prior_lib.predict_eps_cfg(sd, sd.unet_params, x_t, t, cond, uncond, 1)
  )
  eps = {"f32": eps_fn(f32), "bf16": eps_fn(bf16)}
  assert eps["bf16"].dtype == jnp.float32
  assert 1e-3 < _rel_l2(eps["f32"], eps["bf16"]) < TOLERANCE  # bfloat16 ran, and is close
  rgb = jax.random.uniform(keys[1], (1, 128, 128, 3))
  encode = jax.jit(lambda sd: sd_lib.encode_images(sd, rgb))
  x0_f32, x0_bf16 = encode(f32), encode(bf16)
  assert 1e-3 < _rel_l2(x0_f32, x0_bf16) < TOLERANCE


@pytest.mark.torch
def test_trainable_state_and_hash_grid_gradient_stay_float32_over_a_bfloat16_prior(bf16_step):
  _, frozen, state, closed, out_state = bf16_step
  assert {x.dtype for x in jax.tree.leaves(frozen["phi_base"])} == {jnp.dtype(jnp.bfloat16)}
  for tree in (state, out_state):
    for part in ("particles", "particle_opt", "phi", "phi_opt"):
      leaves = jax.tree.leaves(tree[part])
      dtypes = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
      assert dtypes == {jnp.dtype(jnp.float32)}, part
  # The hash tables' gradient (the transpose of the grid's gather, a scatter-add) is float32;
  # the frozen UNet's own scatter-adds (its upsampling's gradient) are bfloat16.
  scatters = [
    e
    for e in eqns(closed.jaxpr)
    if e.primitive.name == "scatter-add" and "hashgrid.py" in summarize(e.source_info)
  ]
  assert scatters and {e.outvars[0].aval.dtype for e in scatters} == {jnp.dtype(jnp.float32)}


def test_auto_dtype_is_float32_on_the_cpu_and_bfloat16_on_accelerators():
  assert jax.default_backend() == "cpu"  # conftest.py
  assert models.prior_dtype("auto") == jnp.float32
  assert (
    models.prior_dtype("auto", "gpu", "9.0") == models.prior_dtype("auto", "tpu") == jnp.bfloat16
  )
  assert models.prior_dtype("auto", "gpu", "8.0") == jnp.bfloat16  # A100
  assert models.prior_dtype("auto", "gpu", "7.5") == jnp.float32  # T4: no bfloat16 dot
  assert models.prior_dtype("auto", "gpu", "gfx90a") == jnp.bfloat16  # ROCm
  assert models.prior_dtype("bfloat16") == jnp.bfloat16
  assert models.prior_dtype("float32", "gpu") == jnp.float32


@pytest.mark.torch
def test_the_step_computes_no_weight_gradient_of_a_frozen_network(bf16_step):
  """Convolutions of one VSD step = VAE forward + its input gradient, one UNet call
  for the CFG pair and eps_phi's target (eps_phi is LoRA on the prior's UNet:
  one batch-3 call), and eps_phi's LoRA update; each
  part counted in a program of its own whose gradient is taken w.r.t. the image
  or the LoRA / camera pytree only (JAX then adds no weight gradient)."""
  m, frozen, state, closed, _ = bf16_step
  sd, key = frozen["prior"]["sd"], jax.random.PRNGKey(2)
  rgb = jnp.zeros((1, 128, 128, 3))  # the render resized to the prior's size

  def vae_loss(rgb, vae_params):
    return jnp.sum(sd_lib.encode_images(dataclasses.replace(sd, vae_params=vae_params), rgb, key))

  vae_forward = _convs(vae_loss, rgb, sd.vae_params)
  vae = _convs(jax.grad(vae_loss), rgb, sd.vae_params)
  vae_with_weights = _convs(jax.grad(vae_loss, argnums=(0, 1)), rgb, sd.vae_params)
  # The count sees a weight gradient: one more convolution per convolution.
  assert vae == 2 * vae_forward and vae_with_weights == 3 * vae_forward

  x_t, t, emb = jnp.zeros((1, 4, 16, 16)), jnp.array([500]), frozen["phi_emb"][None]
  unet = _convs(lambda x: sd_lib.predict_eps(sd, sd.unet_params, x, t, emb), x_t)
  phi_loss = lambda phi: m.eps_phi.loss(frozen["phi_base"], phi, x_t, emb, jnp.zeros((1, 16)), key)
  phi = _convs(jax.grad(lambda p: phi_loss(p)[0]), state["phi"])
  assert unet < phi <= 2 * unet  # forward and at most one input gradient per convolution

  step = sum(e.primitive.name == "conv_general_dilated" for e in eqns(closed.jaxpr))
  assert m.batch_with_prior and step == vae + unet + phi


@pytest.mark.torch
def test_the_lora_update_makes_no_product_of_a_frozen_kernels_shape(bf16_step):
  """eps_phi's update adds the adapters beside the frozen kernels (lora.intercept), so
  its gradient needs no [in, out] product: neither x^T dy nor A B. A merged LoRA
  (the control) makes both."""
  m, frozen, state, _, _ = bf16_step
  key, emb = jax.random.PRNGKey(2), frozen["phi_emb"][None]
  x0, camera = jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, 16))
  paths = lora_lib.paths(state["phi"]["lora"])
  kernel_shapes = {get(frozen["phi_base"], path)["kernel"].shape for path in paths}
  kernel_shapes -= {x.shape for x in jax.tree.leaves(state["phi"]["camera"])}
  assert len(kernel_shapes) >= 3

  def kernel_shaped_products(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return sum(
      e.primitive.name == "dot_general" and e.outvars[0].aval.shape in kernel_shapes
      for e in eqns(jaxpr)
    )

  unmerged = lambda phi: m.eps_phi.loss(frozen["phi_base"], phi, x0, emb, camera, key)[0]
  assert kernel_shaped_products(jax.grad(unmerged), state["phi"]) == 0

  def merged(phi):
    params = lora_lib.merge(frozen["phi_base"], phi["lora"], m.eps_phi.spec.lora_scale)
    return jnp.sum(sd_lib.predict_eps(frozen["prior"]["sd"], params, x0, jnp.array([500]), emb))

  assert kernel_shaped_products(jax.grad(merged), state["phi"]) >= len(paths)
