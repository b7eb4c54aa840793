"""The UNet's attention through jax.nn.dot_product_attention (stable_diffusion.intercept_attention).

One FlaxAttention is checked against softmax(q k^T / sqrt(d)) v written in
float64 numpy; the whole tiny SD UNet (tests/tiny_sd.py's config, random
weights) against diffusers' own attention, through both call sites: the
prior's predict_raw and eps_phi (camera embedding, LoRA), outputs and LoRA /
camera gradients, in float32 (tight) and bfloat16 (both against float32: the
fused attention, whose softmax is float32, may be no worse than diffusers').
Each UNet program is compiled once per module (cached runs).
"""

import functools

from diffusers.models.attention_flax import FlaxAttention
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vsd
from helpers import walk
from tiny_sd import SCHEDULER_CONFIG, UNET_CONFIG
from vsdjax import checks
from vsdjax.guidance import eps_phi, lora
from vsdjax.prior import schedule, stable_diffusion as sdm
from vsdjax.training import models

BATCH, LATENT, TEXT_LEN = 2, 8, 5
# The tiny UNet runs FlaxAttention 8 times: self and cross in one down block,
# the mid block and the two layers of one up block.
N_ATTENTIONS = 8


def _random_params(shapes, seed, dtype=None):
  """Fan-in scaled kernels, norm scales near 1, small non-zero biases."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=s.shape)
    else:
      value = 0.05 * rng.normal(size=s.shape)
    return jnp.asarray(value, dtype or s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _numpy_attention(params, hidden, context, heads):
  """FlaxAttention in float64 numpy: [B, T, C], [B, S, D] -> [B, T, C]."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)  # [B, T, N, H]
  q = split(hidden @ p["to_q"]["kernel"])
  k = split(context @ p["to_k"]["kernel"])
  v = split(context @ p["to_v"]["kernel"])
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])  # [B, N, T, S]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", probs, v).reshape(hidden.shape[0], hidden.shape[1], -1)
  return out @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]


@pytest.mark.parametrize("split_head_dim", [False, True])
def test_one_attention_is_softmax_attention(split_head_dim):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 12, 32))  # [B, T, C]
  context = rng.normal(size=(2, 7, 32))  # [B, S, D]: D = C, so one module does both
  module = FlaxAttention(query_dim=32, heads=4, dim_head=8, split_head_dim=split_head_dim)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 12, 32))))
  params = _random_params(shapes["params"], seed=1)
  for ctx in (None, context):  # Self- and cross-attention.
    expected = _numpy_attention(params, hidden, hidden if ctx is None else ctx, heads=4)
    for attention in sdm.ATTENTIONS:
      with sdm.intercept_attention(attention):
        args = (jnp.asarray(hidden, jnp.float32),) + (() if ctx is None else (jnp.asarray(ctx),))
        got = module.apply({"params": params}, *args)
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=attention)


def test_unknown_attention_is_refused():
  with pytest.raises(ValueError, match="attention='flash' is unknown"):
    sdm.intercept_attention("flash")
  with pytest.raises(ValueError, match="attention"):
    eps_phi.EpsPhiSpec(attention="flash")


@functools.cache
def _setup(dtype):
  """(unet, base params, inputs) of the tiny SD UNet in `dtype`."""
  unet = sdm.unet_from_config(UNET_CONFIG, dtype)
  base = _random_params(jax.eval_shape(unet.init_weights, jax.random.key(0)), 0, dtype)
  rng = np.random.default_rng(2)
  inputs = {
    "x": jnp.asarray(rng.normal(size=(BATCH, 4, LATENT, LATENT)), jnp.float32),
    "t": jnp.asarray([30, 700]),
    "emb": jnp.asarray(rng.normal(size=(BATCH, TEXT_LEN, 32)), jnp.float32),
    "w": jnp.asarray(rng.normal(size=(BATCH, 4, LATENT, LATENT)), jnp.float32),
    "camera": jnp.asarray(rng.normal(size=(BATCH, eps_phi.CAMERA_DIM)), jnp.float32),
  }
  return unet, base, inputs


def _sd(dtype, attention):
  """The tiny UNet as a StableDiffusion without weights (predict_raw takes them)."""
  unet, _, _ = _setup(dtype)
  return sdm.StableDiffusion(
    modules=sdm.Modules(unet, None, None, None),
    unet_params={},
    vae_params={},
    text_params={},
    alphas_cumprod=jnp.asarray(schedule.alphas_cumprod(SCHEDULER_CONFIG), jnp.float32),
    prediction_type="epsilon",
    scaling_factor=0.18215,
    dtype=dtype,
    name="tiny",
    attention=attention,
  )


def _eps_phi(dtype, attention):
  """eps_phi (LoRA rank 2) on the tiny UNet."""
  unet, _, _ = _setup(dtype)
  spec = eps_phi.EpsPhiSpec(rank=2, attention=attention)
  return eps_phi.EpsPhi(unet, spec, schedule.alphas_cumprod(SCHEDULER_CONFIG), "epsilon")


def _trained_like(tree, seed):
  """Leaves that start at zero (LoRA B, the camera MLP's biases and output layer)
  drawn from N(0, 0.05^2), as after some training."""
  rng = np.random.default_rng(seed)
  draw = lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype)
  return jax.tree.map(lambda x: x if np.any(x) else draw(x), tree)


@functools.cache
def _prior_run(dtype, attention):
  """predict_raw of the base and of LoRA-merged params: {'plain', 'adapted'} [B, 4, h, w]."""
  _, base, inp = _setup(dtype)
  predict = functools.partial(sdm.predict_raw, _sd(dtype, attention))
  adapters = _trained_like(lora.init(jax.random.key(3), base, rank=2), seed=4)

  @jax.jit
  def run(adapters):
    adapted = predict(lora.merge(base, adapters, 1.5), inp["x"], inp["t"], inp["emb"])
    return {"plain": predict(base, inp["x"], inp["t"], inp["emb"]), "adapted": adapted}

  return jax.tree.map(np.asarray, run(adapters))


@functools.cache
def _eps_phi_run(dtype, attention):
  """eps_phi.apply (non-zero LoRA and camera MLP) and the gradient of <w, apply> w.r.t.
  them: {'out': [B, 4, h, w], 'grads': {'lora', 'camera'}}."""
  _, base, inp = _setup(dtype)
  model = _eps_phi(dtype, attention)
  trainable = _trained_like(model.init(jax.random.key(5), base), seed=6)

  def run(trainable):
    out = model.apply(base, trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
    return jnp.sum(out.astype(jnp.float32) * inp["w"]), out

  (_, out), grads = jax.jit(jax.value_and_grad(run, has_aux=True))(trainable)
  return {"out": np.asarray(out, np.float32), "grads": jax.tree.map(np.asarray, grads)}


RUNS = {"prior": _prior_run, "eps_phi": _eps_phi_run}


def _rel(x, y):
  """max |x - y| / max |y|."""
  return float(np.max(np.abs(np.asarray(x, np.float64) - y)) / np.max(np.abs(y)))


@pytest.mark.parametrize("site", sorted(RUNS))
def test_unet_runs_dot_product_attention_at_every_attention(site, monkeypatch):
  calls = []
  original = jax.nn.dot_product_attention

  def counted(*args, **kwargs):
    calls.append(args[0].shape)
    return original(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", counted)
  _, base, inp = _setup(jnp.float32)
  for attention in ("fused", "diffusers"):
    calls.clear()
    if site == "prior":
      sd = _sd(jnp.float32, attention)
      jax.eval_shape(sdm.predict_raw, sd, base, inp["x"], inp["t"], inp["emb"])
    else:
      model = _eps_phi(jnp.float32, attention)
      trainable = model.init(jax.random.key(0), base)
      jax.eval_shape(model.apply, base, trainable, inp["x"], inp["t"], inp["emb"], inp["camera"])
    if attention == "diffusers":
      assert not calls
    else:
      assert len(calls) == N_ATTENTIONS
      # [B, T, N, H]: the 8x8 latent's 64 tokens at the first level, 2 heads of 16.
      assert (BATCH, LATENT * LATENT, 2, 16) in calls


def test_fused_matches_diffusers_in_float32_prior():
  fused = _prior_run(jnp.float32, "fused")
  ref = _prior_run(jnp.float32, "diffusers")
  assert np.std(ref["plain"]) > 0.1
  for name in ("plain", "adapted"):
    assert _rel(fused[name], ref[name]) < 1e-5, name
  # LoRA-merged kernels reach the fused attention: the adapters move its
  # output as they move diffusers'.
  assert _rel(fused["adapted"], fused["plain"]) > 1e-2
  change, ref_change = fused["adapted"] - fused["plain"], ref["adapted"] - ref["plain"]
  assert _rel(change, ref_change) < 1e-4


def test_fused_matches_diffusers_in_float32_eps_phi():
  fused = _eps_phi_run(jnp.float32, "fused")
  ref = _eps_phi_run(jnp.float32, "diffusers")
  assert np.std(ref["out"]) > 0.1
  assert _rel(fused["out"], ref["out"]) < 1e-5
  leaves = list(zip(walk(fused["grads"]), walk(ref["grads"])))
  assert len(leaves) == 2 * 4 * N_ATTENTIONS + 4  # A and B of q, k, v, out; camera MLP.
  for (path, g), (_, g_ref) in leaves:
    # Every LoRA factor and camera weight gets a gradient (B != 0, so A's
    # gradient is non-zero only if the merged kernel is used), diffusers'.
    assert np.max(np.abs(g)) > 1e-6, path
    assert _rel(g, g_ref) < 5e-4, path


def _flat(tree):
  return np.concatenate([np.ravel(x) for _, x in walk(tree)]).astype(np.float64)


def _cosine(x, y):
  return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _check_bfloat16(exact, fused, ref):
  """Both bfloat16 UNets err (~1e-2 of the output); the fused softmax runs in
  float32, diffusers' in bfloat16: the fused may be no further from float32."""
  err, ref_err = _rel(fused, exact), _rel(ref, exact)
  assert 1e-4 < err < 5e-2 and err < 1.25 * ref_err, (err, ref_err)


def test_fused_in_bfloat16_is_as_close_to_float32_as_diffusers_prior():
  exact = _prior_run(jnp.float32, "fused")
  fused = _prior_run(jnp.bfloat16, "fused")
  ref = _prior_run(jnp.bfloat16, "diffusers")
  for name in ("plain", "adapted"):
    _check_bfloat16(exact[name], fused[name], ref[name])


@pytest.mark.slow
def test_fused_in_bfloat16_is_as_close_to_float32_as_diffusers_eps_phi():
  exact = _eps_phi_run(jnp.float32, "fused")
  fused = _eps_phi_run(jnp.bfloat16, "fused")
  ref = _eps_phi_run(jnp.bfloat16, "diffusers")
  _check_bfloat16(exact["out"], fused["out"], ref["out"])
  cosine = _cosine(_flat(fused["grads"]), _flat(exact["grads"]))
  assert cosine > 0.99
  assert cosine > _cosine(_flat(ref["grads"]), _flat(exact["grads"])) - 1e-3


def test_config_field_reaches_both_unets():
  c = vsd.get_config()
  assert c.prior.attention == "fused"
  c.prior.attention = "diffusers"
  checks.validate_config(c)
  m, frozen = models.build_abstract(c)  # Abstract SD 2.1-base and 2.1 UNets.
  assert frozen["prior"]["sd"].attention == "diffusers"
  assert m.eps_phi.spec.attention == "diffusers"
  c.prior.attention = "flash"
  with pytest.raises(checks.ConfigError, match="prior.attention"):
    checks.validate_config(c)
