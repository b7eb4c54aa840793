"""Tests of vsdjax.lora against hand-written numpy references on a tiny UNet."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import get, walk
from vsdjax.guidance import lora

RANK = 3
ATTN_PARAM_NAMES = ("to_q", "to_k", "to_v", "to_out_0")


@pytest.fixture(scope="module")
def unet():
  """A tiny two-level FlaxUNet2DConditionModel."""
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top

  return FlaxUNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    use_linear_projection=True,
  )


@pytest.fixture(scope="module")
def unet_params(unet):
  """Random parameters of `unet`."""
  shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), shapes)


def _attention_kernels(params):
  """Paths of the attention projection modules found by walking the tree."""
  return {
    path[:-1]
    for path, _ in walk(params)
    if path[-1] == "kernel" and path[-2] in ATTN_PARAM_NAMES and path[-3].startswith("attn")
  }


def _random_lora(params, seed=1):
  """A LoRA tree with non-zero A and B on every attention projection."""
  rng = np.random.default_rng(seed)
  out = lora.init(jax.random.key(seed), params, RANK)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), out)


def test_init_covers_every_attention_projection(unet_params):
  adapters = lora.init(jax.random.key(0), unet_params, RANK)
  expected = _attention_kernels(unet_params)
  # 4 transformer blocks (down 0, mid, 2 in up 1) x 2 attentions x 4 projections.
  assert len(expected) == 32
  assert set(lora.paths(adapters)) == expected
  n = 0
  a_all = []
  for path in expected:
    d_in, d_out = get(unet_params, path + ("kernel",)).shape
    pair = get(adapters, path)
    assert pair["a"].shape == (d_in, RANK) and pair["b"].shape == (RANK, d_out)
    np.testing.assert_array_equal(pair["b"], 0.0)
    a_all.append(np.asarray(pair["a"]).ravel())
    n += RANK * (d_in + d_out)
  assert lora.count(adapters) == n
  a_all = np.concatenate(a_all)
  assert abs(a_all.std() - 1.0 / RANK) < 0.05 / RANK
  assert abs(a_all.mean()) < 0.05 / RANK


def test_targets_by_attribute_or_parameter_name(unet_params):
  by_attr = lora.init(jax.random.key(0), unet_params, RANK, targets=("query", "proj_attn"))
  by_param = lora.init(jax.random.key(0), unet_params, RANK, targets=("to_q", "to_out_0"))
  names = {p[-1] for p in lora.paths(by_attr)}
  assert names == {"to_q", "to_out_0"}
  assert lora.paths(by_attr) == lora.paths(by_param)
  assert len(lora.paths(by_attr)) == 16


def test_merge_matches_numpy_on_one_dense(unet_params):
  adapters = _random_lora(unet_params)
  scale = 4.0 / RANK
  merged = lora.merge(unet_params, adapters, scale)
  # A non-square projection: cross-attention key of the mid block, [32, 64].
  path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")
  w = np.asarray(get(unet_params, path + ("kernel",)), np.float64)
  a = np.asarray(get(adapters, path)["a"], np.float64)
  b = np.asarray(get(adapters, path)["b"], np.float64)
  assert w.shape == (32, 64)
  expected_w = w.copy()
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      expected_w[i, j] += scale * sum(a[i, k] * b[k, j] for k in range(RANK))
  got_w = get(merged, path + ("kernel",))
  np.testing.assert_allclose(got_w, expected_w, rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(2).normal(size=(5, 32))
  y = nn.Dense(64, use_bias=False).apply({"params": {"kernel": got_w}}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, x @ expected_w, rtol=1e-4, atol=1e-4)


def test_merge_touches_only_targets(unet_params):
  adapters = _random_lora(unet_params)
  merged = lora.merge(unet_params, adapters, 0.5)
  targets = {p + ("kernel",) for p in lora.paths(adapters)}
  base_leaves = dict(walk(unet_params))
  merged_leaves = dict(walk(merged))
  assert set(base_leaves) == set(merged_leaves)
  for path, leaf in merged_leaves.items():
    if path in targets:
      assert not np.array_equal(leaf, base_leaves[path]), path
    else:
      assert leaf is base_leaves[path], path
  # Subtrees without adapters are the very same objects.
  assert merged["conv_in"] is unet_params["conv_in"]
  assert merged["down_blocks_1"] is unet_params["down_blocks_1"]


def test_merge_with_zero_b_is_exact(unet_params):
  adapters = lora.init(jax.random.key(3), unet_params, RANK)
  merged = lora.merge(unet_params, adapters, 7.0)
  for (path, x), (_, y) in zip(walk(unet_params), walk(merged)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))


def test_merge_under_jit_and_grad(unet_params):
  adapters = _random_lora(unet_params)
  path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_v")
  g = np.random.default_rng(4).normal(size=get(unet_params, path + ("kernel",)).shape)

  def objective(adapters, scale):
    kernel = get(lora.merge(unet_params, adapters, scale), path + ("kernel",))
    return jnp.sum(kernel * g)

  eager = lora.merge(unet_params, adapters, 0.75)
  jitted = jax.jit(lora.merge)(unet_params, adapters, 0.75)
  for (p, x), (_, y) in zip(walk(eager), walk(jitted)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=str(p))
  grads, grad_scale = jax.jit(jax.grad(objective, argnums=(0, 1)))(adapters, 0.75)
  a = np.asarray(get(adapters, path)["a"], np.float64)
  b = np.asarray(get(adapters, path)["b"], np.float64)
  # d/dA sum(G * (W + s A B)) = s G B^T, d/dB = s A^T G, d/ds = sum(G * A B).
  np.testing.assert_allclose(get(grads, path)["a"], 0.75 * g @ b.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(get(grads, path)["b"], 0.75 * a.T @ g, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_scale, np.sum(g * (a @ b)), rtol=1e-4)
  # Adapters elsewhere do not reach this kernel.
  other = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
  np.testing.assert_array_equal(get(grads, other)["a"], 0.0)


def _unet_inputs(batch):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(batch, 4, 8, 8)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(batch, 5, 32)), jnp.float32)
  return x, jnp.arange(batch) * 300 + 100, emb


def test_intercept_matches_merge_in_value_and_gradient(unet, unet_params):
  """The unmerged update x W + s (x A) B is the merged kernel's output; rows of weight 0
  are the base model's, and the LoRA gradient equals merge's."""
  adapters = jax.tree.map(lambda x: 0.3 * x, _random_lora(unet_params))
  x, t, emb = _unet_inputs(3)
  g = jnp.asarray(np.random.default_rng(8).normal(size=x.shape), jnp.float32)

  def merged(adapters):
    params = lora.merge(unet_params, adapters, 0.75)
    return jnp.sum(g * unet.apply({"params": params}, x, t, emb).sample)

  def unmerged(adapters, rows=None):
    with lora.intercept(adapters, 0.75, rows):
      return unet.apply({"params": unet_params}, x, t, emb).sample  # [B, 4, 8, 8]

  loss = lambda adapters: jnp.sum(g * unmerged(adapters))
  (value, grads), (ref_value, ref_grads) = (
    jax.jit(jax.value_and_grad(f))(adapters) for f in (loss, merged)
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for (p, a), (_, b) in zip(walk(grads), walk(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=str(p))
  assert (
    np.abs(
      get(grads, ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q"))["b"]
    ).max()
    > 0
  )

  base = unet.apply({"params": unet_params}, x, t, emb).sample
  adapted = unet.apply({"params": lora.merge(unet_params, adapters, 0.75)}, x, t, emb).sample
  mixed = jax.jit(unmerged)(adapters, jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_allclose(mixed[::2], base[::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[1], adapted[1], rtol=1e-4, atol=1e-4)
  assert np.abs(adapted - base).max() > 1e-2
  # A non-finite adapter leaves the base rows alone (0 * inf would not).
  broken = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), adapters)
  mixed = jax.jit(unmerged)(broken, jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_allclose(mixed[::2], base[::2], rtol=1e-5, atol=1e-5)
  assert not np.isfinite(mixed[1]).all()


def test_bad_input_raises(unet, unet_params):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="rank"):
    lora.init(key, unet_params, 0)
  with pytest.raises(ValueError, match="targets"):
    lora.init(key, unet_params, 2, targets=("qkv",))
  with pytest.raises(ValueError, match="targets"):
    lora.init(key, unet_params, 2, targets="query")
  with pytest.raises(ValueError, match="unet_params"):
    lora.init(key, {"conv_in": unet_params["conv_in"]}, 2)
  adapters = lora.init(key, unet_params, RANK)
  with pytest.raises(ValueError, match="not in base_params"):
    lora.merge({k: v for k, v in unet_params.items() if k != "mid_block"}, adapters, 1.0)
  bad = jax.tree.map(lambda x: x, adapters)
  path = ("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
  get(bad, path)["a"] = jnp.zeros((5, RANK))
  with pytest.raises(ValueError, match="shapes"):
    lora.merge(unet_params, bad, 1.0)
  with pytest.raises(ValueError, match="scale"):
    lora.merge(unet_params, adapters, math.inf)
  with pytest.raises(ValueError, match="scale"):
    lora.merge(unet_params, adapters, jnp.ones(2))
  with pytest.raises(ValueError, match="lora"):
    lora.count({"x": jnp.zeros(3)})
  x, t, emb = _unet_inputs(2)
  elsewhere = {"nowhere": get(adapters, ("mid_block",))}
  with pytest.raises(ValueError, match="met no Dense module"):
    with lora.intercept(elsewhere, 1.0):
      unet.apply({"params": unet_params}, x, t, emb)
  with pytest.raises(ValueError, match="rows"):
    with lora.intercept(adapters, 1.0, jnp.ones(3)):
      unet.apply({"params": unet_params}, x, t, emb)
