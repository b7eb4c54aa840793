"""Tests of vsdjax.eps_phi on a tiny random FlaxUNet2DConditionModel.

References are independent of the code under test: the UNet's forward is
re-run by hand from its submodules with the time embedding shifted by a camera
embedding computed in numpy, and LoRA kernels are merged in numpy. Each jitted
function is compiled once per module (the UNet is the costly part on a CPU);
"full" mode, which differentiates every UNet parameter, and the vmap test run
on a smaller UNet without attention.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import get, walk
from vsdjax.guidance import eps_phi, lora
from vsdjax.prior import schedule, stable_diffusion

BATCH, CHANNELS, HEIGHT, WIDTH = 4, 4, 8, 16  # Non-square latents.
TEXT_LEN, TEXT_DIM = 3, 32
# 64 channels: GroupNorm has 32 groups, and with one channel per group it would
# remove the per-channel shift that the time embedding adds in every ResNet.
CHANNELS_0 = 64
TEMB = 4 * CHANNELS_0  # Time-embedding width.
SPEC = eps_phi.EpsPhiSpec(rank=2, alpha=3.0, camera_dropout=0.5, camera_hidden=24)
FULL_SPEC = eps_phi.EpsPhiSpec(mode="full", camera_dropout=0.5)


def _random_params(shapes, seed):
  """Random UNet parameters: fan-in scaled kernels, norms near identity."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      std = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(size=s.shape) * std, s.dtype)
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=s.shape), s.dtype)
    return jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def setup():
  """Tiny UNet (one cross-attention level + mid block), random weights, inputs."""
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top

  unet = FlaxUNet2DConditionModel(
    sample_size=8,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    block_out_channels=(CHANNELS_0,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=TEXT_DIM,
    use_linear_projection=True,
  )
  base = _random_params(jax.eval_shape(unet.init_weights, jax.random.key(0)), seed=0)
  rng = np.random.default_rng(1)
  inputs = {
    "x": jnp.asarray(rng.normal(size=(BATCH, CHANNELS, HEIGHT, WIDTH)), jnp.float32),
    "t": jnp.array([3, 250, 601, 999], jnp.int32),
    "emb": jnp.asarray(rng.normal(size=(BATCH, TEXT_LEN, TEXT_DIM)), jnp.float32),
    "camera": jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32),
  }
  alphas_cumprod = schedule.alphas_cumprod(schedule.SD_SCHEDULER)
  return unet, base, inputs, alphas_cumprod


@pytest.fixture(scope="module")
def fns(setup):
  """The jitted functions shared by the tests (each compiled once)."""
  unet, base, _, alphas_cumprod = setup

  def manual_forward(module, sample, timesteps, context, t_emb_shift):
    """diffusers' UNet forward, written out, with t_emb + t_emb_shift."""
    from diffusers.models.unets import unet_2d_blocks_flax as blocks

    t_emb = module.time_embedding(module.time_proj(timesteps)) + t_emb_shift
    h = module.conv_in(jnp.transpose(sample, (0, 2, 3, 1)))
    res = (h,)
    for block in module.down_blocks:
      if isinstance(block, blocks.FlaxCrossAttnDownBlock2D):
        h, r = block(h, t_emb, context, deterministic=True)
      else:
        h, r = block(h, t_emb, deterministic=True)
      res += r
    h = module.mid_block(h, t_emb, context, deterministic=True)
    for block in module.up_blocks:
      n = module.layers_per_block + 1
      r, res = res[-n:], res[:-n]
      if isinstance(block, blocks.FlaxCrossAttnUpBlock2D):
        h = block(
          h,
          temb=t_emb,
          encoder_hidden_states=context,
          res_hidden_states_tuple=r,
          deterministic=True,
        )
      else:
        h = block(h, temb=t_emb, res_hidden_states_tuple=r, deterministic=True)
    h = module.conv_out(nn.silu(module.conv_norm_out(h)))
    return jnp.transpose(h, (0, 3, 1, 2))

  @jax.jit
  def references(params, x, t, emb, t_emb_shift):
    with nn.intercept_methods(stable_diffusion.exact_geglu):  # eps_phi's GELU is the prior's
      plain = unet.apply({"params": params}, x, t, emb, return_dict=False)[0]
      manual = unet.apply({"params": params}, x, t, emb, t_emb_shift, method=manual_forward)
    return plain, manual

  def make_step(spec, unet, base, prediction_type, optimizer):
    model = eps_phi.EpsPhi(unet, spec, alphas_cumprod, prediction_type)

    @jax.jit
    def step(trainable, opt_state, x0, emb, camera, key):
      (value, aux), grads = jax.value_and_grad(model.loss, argnums=1, has_aux=True)(
        base, trainable, x0, emb, camera, key
      )
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value, aux, grads

    return step

  return {
    "apply": jax.jit(functools.partial(_model(unet, SPEC, alphas_cumprod).apply, base)),
    "references": references,
    "make_step": make_step,
  }


@pytest.fixture(scope="module")
def micro(setup):
  """A UNet without attention (cheap to differentiate) for "full" mode."""
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top

  _, _, inp, _ = setup
  unet = FlaxUNet2DConditionModel(
    sample_size=8,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    block_out_channels=(32,),
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    layers_per_block=1,
    cross_attention_dim=TEXT_DIM,
  )
  shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))
  base = _random_params(shapes, seed=10)
  plain = jax.jit(
    lambda params, x, t: unet.apply({"params": params}, x, t, inp["emb"], return_dict=False)[0]
  )
  return unet, base, plain


def _model(unet, spec, alphas_cumprod, prediction_type="v_prediction"):
  return eps_phi.EpsPhi(unet, spec, alphas_cumprod, prediction_type)


def _np_camera_mlp(params, camera):
  """The camera MLP in float64 numpy: silu between two affine layers."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  h = np.asarray(camera, np.float64) @ p["layer_0"]["w"] + p["layer_0"]["b"]
  h = h / (1.0 + np.exp(-h))
  return h @ p["layer_1"]["w"] + p["layer_1"]["b"]


def _randomize(tree, seed, std):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * std, x.dtype), tree)


def test_init_equals_base_for_any_camera(setup, fns):
  unet, base, inp, abar = setup
  trainable = _model(unet, SPEC, abar).init(jax.random.key(1), base)
  assert set(trainable) == {"lora", "camera"}
  assert trainable["camera"]["layer_0"]["w"].shape == (16, 24)
  assert trainable["camera"]["layer_1"]["w"].shape == (24, TEMB)
  # Exactly the base function: merged kernels equal W bit for bit and the
  # camera embedding is exactly 0, for any camera ...
  merged = lora.merge(base, trainable["lora"], SPEC.lora_scale)
  for (path, x), (_, y) in zip(walk(base), walk(merged)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  plain, _ = fns["references"](base, inp["x"], inp["t"], inp["emb"], jnp.zeros((BATCH, TEMB)))
  for camera in (inp["camera"], jnp.zeros_like(inp["camera"]), 10.0 * inp["camera"]):
    np.testing.assert_array_equal(eps_phi.camera_embedding(trainable["camera"], camera), 0.0)
    out = fns["apply"](trainable, inp["x"], inp["t"], inp["emb"], camera)
    assert out.shape == (BATCH, CHANNELS, HEIGHT, WIDTH)
    # ... so the outputs differ only by XLA's fusion of two different graphs
    # (about 1e-6 here; the same ops run eagerly agree bit for bit).
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)
  assert np.std(plain) > 0.1


def test_camera_is_added_to_time_embedding_and_lora_merged(setup, fns):
  unet, base, inp, abar = setup
  trainable = _model(unet, SPEC, abar).init(jax.random.key(1), base)
  trainable["camera"] = _randomize(trainable["camera"], seed=5, std=0.3)
  cam_emb = _np_camera_mlp(trainable["camera"], inp["camera"])  # [B, TEMB]
  plain, manual0 = fns["references"](base, inp["x"], inp["t"], inp["emb"], jnp.zeros((BATCH, TEMB)))
  # The hand-written forward is diffusers' forward.
  np.testing.assert_allclose(manual0, plain, rtol=1e-5, atol=1e-5)

  # Camera only (B = 0): the time embedding shifted by the numpy camera MLP.
  cam_emb = jnp.asarray(cam_emb, jnp.float32)
  _, expected = fns["references"](base, inp["x"], inp["t"], inp["emb"], cam_emb)
  out = fns["apply"](trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(out - plain)) > 1e-2

  # Camera and non-zero LoRA: numpy-merged kernels W + (alpha / r) A @ B.
  trainable["lora"] = _randomize(trainable["lora"], seed=6, std=0.2)
  merged = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
  for path in lora.paths(trainable["lora"]):
    a = np.asarray(get(trainable["lora"], path)["a"], np.float64)
    b = np.asarray(get(trainable["lora"], path)["b"], np.float64)
    get(merged, path)["kernel"] = get(merged, path)["kernel"] + 1.5 * a @ b
  merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged)
  _, expected = fns["references"](merged, inp["x"], inp["t"], inp["emb"], cam_emb)
  out_lora = fns["apply"](trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
  np.testing.assert_allclose(out_lora, expected, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(out_lora - out)) > 1e-2


@pytest.mark.slow
def test_lora_training_lowers_loss_and_touches_only_trainable(setup, fns):
  unet, base, inp, alphas_cumprod = setup
  base_before = jax.tree.map(np.array, base)
  trainable = _model(unet, SPEC, alphas_cumprod).init(jax.random.key(2), base)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(trainable)
  # Optimizer state exists for the trainable pytree only.
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert n_state == 2 * n_trainable  # Adam's mu and nu.
  assert n_trainable < 0.2 * sum(x.size for x in jax.tree.leaves(base))
  step = fns["make_step"](SPEC, unet, base, "v_prediction", optimizer)
  x0, key = 0.5 * inp["x"], jax.random.key(7)  # Fixed batch and noise.
  losses = []
  for i in range(20):
    new, opt_state, value, aux, _ = step(trainable, opt_state, x0, inp["emb"], inp["camera"], key)
    if i == 0:
      first_aux, first = aux, value
      initial = trainable
    trainable = new
    losses.append(float(value))

  # The first loss is the v-prediction MSE computed by hand from aux.
  dropped = np.asarray(first_aux["camera_dropped"])
  assert dropped.any() and not dropped.all()  # This key exercises both branches.
  abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(first_aux["t"])]
  a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1.0 - abar)[:, None, None, None]
  noise, x0_np = np.asarray(first_aux["noise"], np.float64), np.asarray(x0, np.float64)
  camera = np.where(dropped[:, None], 0.0, np.asarray(inp["camera"]))
  out = fns["apply"](
    initial,
    jnp.asarray(a * x0_np + s * noise, jnp.float32),
    first_aux["t"],
    inp["emb"],
    jnp.asarray(camera, jnp.float32),
  )
  v = a * noise - s * x0_np
  np.testing.assert_allclose(first, np.mean((np.asarray(out, np.float64) - v) ** 2), rtol=1e-4)

  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0]
  for (path, x), (_, y) in zip(walk(base_before), walk(base)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  for path in lora.paths(trainable["lora"]):
    assert np.any(np.asarray(get(trainable["lora"], path)["b"]) != 0), path
  assert np.any(np.asarray(trainable["camera"]["layer_1"]["w"]) != 0)
  out_cam = fns["apply"](trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
  out_none = fns["apply"](trainable, inp["x"], inp["t"], inp["emb"], jnp.zeros_like(inp["camera"]))
  assert np.max(np.abs(out_cam - out_none)) > 1e-4


@pytest.mark.slow
def test_full_mode_trains_every_unet_param(setup, fns, micro):
  _, _, inp, alphas_cumprod = setup
  unet, base, plain_fn = micro
  trainable = _model(unet, FULL_SPEC, alphas_cumprod).init(jax.random.key(3), base)
  assert set(trainable) == {"unet", "camera"}
  for (path, x), (_, y) in zip(walk(base), walk(trainable["unet"])):
    assert x is not y
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(trainable)
  step = fns["make_step"](FULL_SPEC, unet, base, "epsilon", optimizer)
  key = jax.random.key(8)
  new, opt_state, value, aux, grads = step(
    trainable, opt_state, inp["x"], inp["emb"], inp["camera"], key
  )

  # The epsilon target: MSE against the sampled noise. At init the camera MLP
  # outputs 0, so the full-mode model is the plain base UNet.
  abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(aux["t"])]
  a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1.0 - abar)[:, None, None, None]
  noise = np.asarray(aux["noise"], np.float64)
  x_t = a * np.asarray(inp["x"], np.float64) + s * noise
  plain = np.asarray(plain_fn(base, jnp.asarray(x_t, jnp.float32), aux["t"]), np.float64)
  np.testing.assert_allclose(value, np.mean((plain - noise) ** 2), rtol=1e-4)

  for path, g in walk(grads["unet"]):
    assert np.any(np.asarray(g) != 0), path
  # The zero last camera layer gets a gradient (the first one not yet).
  assert np.any(np.asarray(grads["camera"]["layer_1"]["w"]) != 0)
  for (path, x), (_, y) in zip(walk(base), walk(new["unet"])):
    assert not np.array_equal(x, y), path
  _, _, value2, _, _ = step(new, opt_state, inp["x"], inp["emb"], inp["camera"], key)
  assert float(value2) < float(value)


def test_predict_eps_converts_v_under_jit_and_vmap(setup, micro):
  _, _, inp, alphas_cumprod = setup
  unet, base, _ = micro
  v_model = _model(unet, FULL_SPEC, alphas_cumprod, "v_prediction")
  eps_model = _model(unet, FULL_SPEC, alphas_cumprod, "epsilon")
  trainable = v_model.init(jax.random.key(1), base)
  trainable["camera"] = _randomize(trainable["camera"], seed=9, std=0.3)
  apply = jax.jit(functools.partial(v_model.apply, base))
  # Two "particles" on a leading axis: [2, B, ...].
  xs = jnp.stack([inp["x"], -inp["x"]])
  cams = jnp.stack([inp["camera"], jnp.zeros_like(inp["camera"])])
  eps = jax.jit(
    jax.vmap(lambda x, c: v_model.predict_eps(base, trainable, x, inp["t"], inp["emb"], c))
  )(xs, cams)
  abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(inp["t"])]
  a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1.0 - abar)[:, None, None, None]
  for i in range(2):
    v = np.asarray(apply(trainable, xs[i], inp["t"], inp["emb"], cams[i]), np.float64)
    np.testing.assert_allclose(eps[i], s * np.asarray(xs[i]) + a * v, rtol=1e-4, atol=1e-4)
  eps_type = jax.jit(
    lambda x, c: eps_model.predict_eps(base, trainable, x, inp["t"], inp["emb"], c)
  )(xs[0], cams[0])
  np.testing.assert_allclose(
    eps_type, apply(trainable, xs[0], inp["t"], inp["emb"], cams[0]), rtol=1e-5, atol=1e-5
  )


def test_init_from_shapes_only(setup):
  unet, base, _, abar = setup
  model = _model(unet, SPEC, abar)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  from_shapes = model.init(jax.random.key(4), shapes)
  from_arrays = model.init(jax.random.key(4), base)
  for (path, x), (_, y) in zip(walk(from_shapes), walk(from_arrays)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  assert lora.count(from_shapes["lora"]) == sum(
    2 * (d_in + d_out)
    for (d_in, d_out) in (get(base, p + ("kernel",)).shape for p in lora.paths(from_shapes["lora"]))
  )


def test_bad_input_raises(setup):
  unet, base, inp, alphas_cumprod = setup
  with pytest.raises(ValueError, match="mode"):
    eps_phi.EpsPhiSpec(mode="dora")
  with pytest.raises(ValueError, match="rank"):
    eps_phi.EpsPhiSpec(rank=0)
  with pytest.raises(ValueError, match="alpha"):
    eps_phi.EpsPhiSpec(alpha=float("nan"))
  with pytest.raises(ValueError, match="camera_dropout"):
    eps_phi.EpsPhiSpec(camera_dropout=1.5)
  with pytest.raises(ValueError, match="camera_hidden"):
    eps_phi.EpsPhiSpec(camera_hidden=0)
  model, full = _model(unet, SPEC, alphas_cumprod), _model(unet, FULL_SPEC, alphas_cumprod)
  with pytest.raises(ValueError, match="base_params"):
    model.init(jax.random.key(0), {"conv_in": base["conv_in"]})
  trainable = model.init(jax.random.key(0), base)
  for name, bad in (
    ("x_t", inp["x"][:, :3]),
    ("t", inp["t"][:2]),
    ("emb", inp["emb"][..., :5]),
    ("camera", inp["camera"][:, :12]),
  ):
    kw = {"x_t": inp["x"], "t": inp["t"], "emb": inp["emb"], "camera": inp["camera"], name: bad}
    with pytest.raises(ValueError, match=name):
      model.apply(base, trainable, **kw)
  with pytest.raises(ValueError, match="trainable"):
    full.apply(base, trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
  with pytest.raises(ValueError, match="prediction_type"):
    _model(unet, SPEC, alphas_cumprod, "sample")
