"""vsdjax.prior.stable_diffusion against diffusers' and transformers' PyTorch models.

Parity runs on tiny random models (tests/tiny_sd.py) saved as safetensors and
loaded back through the converter: text embeddings against
StableDiffusionPipeline.encode_prompt, UNet eps (epsilon and v-prediction,
with and without guidance), VAE latents, their gradient and decodes, all on
non-square 8x16 latents / 64x128 images. The real SD 2.1 architectures are
checked with jax.eval_shape and torch meta tensors (no memory, no weights).
"""

import json
import os
import shutil

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
import flax.serialization
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from tiny_sd import tiny_sd, tiny_sd_v  # noqa: F401 (fixtures)
from vsdjax import prior
from vsdjax.prior import convert, stable_diffusion as sdm

pytestmark = pytest.mark.torch  # Every test compares with, or builds, PyTorch models.

RTOL = 1e-4
PROMPTS = ["a chair on the table", "the chair"]
TIMESTEPS = np.array([37, 801])


def rel_err(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def pipeline(tiny) -> StableDiffusionPipeline:
  return StableDiffusionPipeline(
    vae=tiny.vae,
    text_encoder=tiny.text_encoder,
    tokenizer=tiny.tokenizer,
    unet=tiny.unet,
    scheduler=tiny.scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_sd_v):
  """prediction type -> (TinySD, loaded StableDiffusion)."""
  return {
    t.scheduler.config.prediction_type: (t, sdm.load_stable_diffusion(t.path))
    for t in (tiny_sd, tiny_sd_v)
  }


@pytest.fixture(scope="module")
def torch_embeddings(tiny_sd):
  """(cond, uncond) [2, 77, 32] numpy, from the diffusers pipeline."""
  with torch.no_grad():
    cond, uncond = pipeline(tiny_sd).encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
  return cond.numpy(), uncond.numpy()


def test_text_embeddings_match_pipeline(models, torch_embeddings):
  _, sd = models["epsilon"]
  cond, uncond = torch_embeddings
  ours = sdm.encode_prompts(sd, PROMPTS + ["", ""])
  assert ours.shape == (4, 77, 32) and ours.dtype == jnp.float32
  assert rel_err(ours[:2], cond) <= RTOL
  assert rel_err(ours[2:], uncond) <= RTOL
  assert rel_err(sdm.encode_prompts(sd, "the chair")[0], cond[1]) <= RTOL


def test_alphas_cumprod_match_ddpm_scheduler(models):
  for tiny, sd in models.values():
    expected = DDPMScheduler.from_pretrained(tiny.path, subfolder="scheduler")
    np.testing.assert_allclose(sd.alphas_cumprod, expected.alphas_cumprod.numpy(), rtol=1e-6)
    assert sd.prediction_type == tiny.scheduler.config.prediction_type


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_eps_with_and_without_cfg_match_torch(models, torch_embeddings, prediction_type):
  tiny, sd = models[prediction_type]
  cond, uncond = torch_embeddings
  x_t = np.random.default_rng(0).normal(size=(2, 4, 8, 16)).astype(np.float32)
  # Reference: the pipeline's batched UNet call, then (for v) the
  # scheduler-free conversion eps = s_t x_t + a_t v in float64.
  with torch.no_grad():
    out = tiny.unet(
      torch.from_numpy(np.concatenate([x_t, x_t])),
      torch.from_numpy(np.concatenate([TIMESTEPS, TIMESTEPS])),
      encoder_hidden_states=torch.from_numpy(np.concatenate([uncond, cond])),
    ).sample.numpy()
  out_uncond, out_cond = np.split(out.astype(np.float64), 2)
  if prediction_type == "v_prediction":
    abar = tiny.scheduler.alphas_cumprod.numpy().astype(np.float64)[TIMESTEPS]
    a_t, s_t = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    out_uncond = s_t * x_t + a_t * out_uncond
    out_cond = s_t * x_t + a_t * out_cond

  guided = jax.jit(lambda p, x, t, c, u, w: prior.predict_eps_cfg(sd, p, x, t, c, u, w))
  for scale in (0.0, 1.0, 7.5):
    ours = guided(sd.unet_params, x_t, TIMESTEPS, cond, uncond, scale)
    expected = out_uncond + scale * (out_cond - out_uncond)
    assert ours.dtype == jnp.float32
    assert rel_err(ours, expected) <= RTOL, scale


def test_vae_encode_gradient_sample_and_decode_match_torch(models):
  tiny, sd = models["epsilon"]
  rng = np.random.default_rng(1)
  # A smooth image in [0, 1], 64x128, and a cotangent for the gradient.
  yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 128), indexing="ij")
  rgb = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx * yy)], -1)[None]
  rgb = np.concatenate([rgb, 1 - rgb]).astype(np.float32)  # [2, 64, 128, 3]
  cotangent = rng.normal(size=(2, 4, 8, 16)).astype(np.float32)

  rgb_torch = torch.from_numpy(rgb).requires_grad_(True)
  posterior = tiny.vae.encode(2 * rgb_torch.permute(0, 3, 1, 2) - 1).latent_dist
  mean = posterior.mean * sd.scaling_factor
  (mean * torch.from_numpy(cotangent)).sum().backward()
  std = (posterior.std * sd.scaling_factor).detach().numpy()
  mean, grad = mean.detach().numpy(), rgb_torch.grad.numpy()

  def encode(sd, rgb, key, cotangent):
    latents, vjp = jax.vjp(lambda x: sdm.encode_images(sd, x), rgb)
    return latents, vjp(cotangent)[0], sdm.encode_images(sd, rgb, key)

  # sd as a jit argument: its weights are inputs, not constants of the program.
  lowered = jax.jit(encode).lower(sd, rgb, jax.random.key(0), cotangent)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(sd.vae_params))
  assert len(lowered.as_text()) < weight_bytes
  ours, ours_grad, sample = lowered.compile()(sd, rgb, jax.random.key(0), cotangent)
  assert ours.shape == (2, 4, 8, 16)
  assert rel_err(ours, mean) <= RTOL
  assert rel_err(ours_grad, grad) <= RTOL
  noise = (np.asarray(sample) - mean) / std  # N(0, 1) if sampled right.
  assert abs(noise.mean()) < 0.15 and 0.85 < noise.std() < 1.15

  with torch.no_grad():
    image = tiny.vae.decode(torch.from_numpy(mean) / sd.scaling_factor).sample
  image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  decoded = jax.jit(lambda z: sdm.decode_latents(sd, z))(mean)
  assert decoded.shape == (2, 64, 128, 3)
  assert 0.2 < np.mean((image > 0) & (image < 1))  # Not just clipped values.
  assert rel_err(decoded, image) <= RTOL


def test_bfloat16_params_and_float32_outputs(tiny_sd, models, torch_embeddings):
  sd = sdm.load_stable_diffusion(tiny_sd.path, dtype=jnp.bfloat16)
  for params in (sd.unet_params, sd.vae_params, sd.text_params):
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert sd.alphas_cumprod.dtype == jnp.float32
  emb = sdm.encode_prompts(sd, PROMPTS)
  assert emb.dtype == jnp.float32
  assert rel_err(emb, torch_embeddings[0]) < 5e-2
  out = jax.eval_shape(
    lambda p: sdm.predict_eps(sd, p, jnp.zeros((2, 4, 8, 16)), jnp.array(TIMESTEPS), emb),
    sd.unet_params,
  )
  assert out.shape == (2, 4, 8, 16) and out.dtype == jnp.float32
  latents = jax.eval_shape(lambda x: sdm.encode_images(sd, x), jnp.zeros((1, 64, 128, 3)))
  assert latents.dtype == jnp.float32


def test_geglu_uses_exact_gelu_like_torch():
  # diffusers' Flax GEGLU uses tanh-GELU; the published (PyTorch) weights were
  # trained with the exact one, which predict_raw's interceptor restores.
  from diffusers.models.activations import GEGLU
  from diffusers.models.attention_flax import FlaxGEGLU
  import flax.linen as nn

  torch.manual_seed(0)
  geglu = GEGLU(32, 128)
  x = 3 * np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
  with torch.no_grad():
    expected = geglu(torch.from_numpy(x)).numpy()
  params = {
    "proj": {
      "kernel": geglu.proj.weight.detach().numpy().T,
      "bias": geglu.proj.bias.detach().numpy(),
    }
  }
  module = FlaxGEGLU(32)
  with nn.intercept_methods(sdm.exact_geglu):
    ours = module.apply({"params": params}, x)
  assert rel_err(ours, expected) <= 1e-6
  assert rel_err(module.apply({"params": params}, x), expected) > 1e-5


def _copy(tiny, tmp_path, name: str) -> str:
  folder = os.path.join(tmp_path, name)
  shutil.copytree(tiny.path, folder)
  return folder


def test_msgpack_and_fp16_only_weights_load(tiny_sd, models, tmp_path):
  _, sd = models["epsilon"]
  folder = _copy(tiny_sd, tmp_path, "alt")
  os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "unet", "diffusion_flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(sd.unet_params)))
  text = os.path.join(folder, "text_encoder", "model.safetensors")
  save_file(
    {k: v.astype(np.float16) for k, v in load_file(text).items()},
    text.replace("model.", "model.fp16."),
  )
  os.remove(text)

  alt = sdm.load_stable_diffusion(folder)
  for a, b in zip(jax.tree.leaves(alt.unet_params), jax.tree.leaves(sd.unet_params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(alt.text_params), jax.tree.leaves(sd.text_params)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_loader_errors_name_the_path(tiny_sd, tmp_path):
  missing = os.path.join(tmp_path, "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sdm.load_stable_diffusion(missing)
  with pytest.raises(FileNotFoundError, match="local folder"):
    sdm.load_stable_diffusion("vsdjax-test-nobody/no-such-model")
  with pytest.raises(ValueError, match="float16"):
    sdm.load_stable_diffusion(tiny_sd.path, dtype=jnp.float16)

  folder = _copy(tiny_sd, tmp_path, "no_unet_weights")
  weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match=os.path.join(folder, "unet")):
    sdm.load_stable_diffusion(folder)
  with open(weights.replace(".safetensors", ".bin"), "wb") as f:
    f.write(b"not unpickled")
  with pytest.raises(ValueError, match="pickle"):
    sdm.load_stable_diffusion(folder)

  folder = _copy(tiny_sd, tmp_path, "sample_prediction")
  path = os.path.join(folder, "scheduler", "scheduler_config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump({**config, "prediction_type": "sample"}, f)
  with pytest.raises(ValueError, match=f"{path}.*'sample'"):
    sdm.load_stable_diffusion(folder)

  folder = _copy(tiny_sd, tmp_path, "class_embedding")
  path = os.path.join(folder, "unet", "config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump({**config, "class_embed_type": "timestep"}, f)
  with pytest.raises(ValueError, match="cannot build.*class_embed_type"):
    sdm.load_stable_diffusion(folder)


def test_weight_mismatch_lists_every_key(tiny_sd, tmp_path):
  folder = _copy(tiny_sd, tmp_path, "mismatch")
  path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  weights = load_file(path)
  del weights["conv_in.bias"]
  weights["extra.weight"] = np.zeros(3, np.float32)
  weights["conv_out.bias"] = np.zeros(5, np.float32)
  save_file(weights, path)
  with pytest.raises(ValueError) as error:
    sdm.load_stable_diffusion(folder)
  message = str(error.value)
  assert path in message
  assert "conv_in/bias" in message and "extra.weight" in message
  assert "conv_out.bias -> conv_out/bias: (5,), expected (4,)" in message


def test_old_vae_attention_names_convert_alike(tiny_sd):
  weights = load_file(os.path.join(tiny_sd.path, "vae", "diffusion_pytorch_model.safetensors"))
  target = sdm.abstract_params(sdm.vae_from_config(dict(tiny_sd.vae.config)))
  # Pre-0.14 diffusers names, with 1x1 convolution weights.
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for name, value in weights.items():
    for new, previous in old_names.items():
      if f".{new}." in name:
        name = name.replace(f".{new}.", f".{previous}.")
        value = value[..., None, None] if value.ndim == 2 else value
    old[name] = value
  assert old.keys() != weights.keys()
  expected = flatten_dict(
    convert.convert_state_dict(weights, target, join_indices=True, what="new")
  )
  converted = flatten_dict(convert.convert_state_dict(old, target, join_indices=True, what="old"))
  assert converted.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(converted[key], value)


def _meta_state_dict(module) -> dict:
  """Zero-memory numpy stand-ins (broadcast views) for a meta module's weights."""
  return {
    name: np.broadcast_to(np.float32(0), tuple(p.shape)) for name, p in module.state_dict().items()
  }


def _assert_same_tree(converted, target):
  converted, target = flatten_dict(converted), flatten_dict(target)
  assert converted.keys() == target.keys()
  for key, leaf in target.items():
    assert converted[key].shape == leaf.shape, key


@pytest.mark.parametrize("name", sdm.BUILTIN_CONFIGS)
def test_real_unet_architecture(name):
  with open(os.path.join(sdm.config_dir(name), "unet", "config.json")) as f:
    config = json.load(f)
  target = sdm.abstract_params(sdm.unet_from_config(config))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(target))
  assert round(count / 1e6, 1) == 865.9
  with torch.device("meta"):
    unet = UNet2DConditionModel.from_config(config)
  assert count == sum(p.numel() for p in unet.parameters())
  _assert_same_tree(
    convert.convert_state_dict(_meta_state_dict(unet), target, join_indices=True, what=name), target
  )


def test_real_vae_and_text_encoder_architecture():
  folder = sdm.config_dir("stable-diffusion-2-1-base")
  with open(os.path.join(folder, "vae", "config.json")) as f:
    vae_config = json.load(f)
  with open(os.path.join(folder, "text_encoder", "config.json")) as f:
    text_config = json.load(f)
  with torch.device("meta"):
    vae = AutoencoderKL.from_config(vae_config)
    text = CLIPTextModel(CLIPTextConfig(**text_config))
  for module, flax_module, join in (
    (vae, sdm.vae_from_config(vae_config), True),
    (text, sdm.text_encoder_from_config(text_config), False),
  ):
    target = sdm.abstract_params(flax_module)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(target)) == sum(
      p.numel() for p in module.parameters()
    )
    _assert_same_tree(
      convert.convert_state_dict(_meta_state_dict(module), target, join_indices=join, what="real"),
      target,
    )


@pytest.mark.parametrize("size_in,size_out", [(64, 512), (24, 128), (128, 96)])
def test_resize_matches_torch_bilinear(size_in, size_out):
  """The render -> prior-size resize is F.interpolate(bilinear, align_corners=False)."""
  rgb = np.random.default_rng(0).uniform(size=(2, size_in, size_in, 3)).astype(np.float32)
  ours = sdm.resize_images(jnp.asarray(rgb), size_out)
  theirs = (
    torch.nn.functional.interpolate(
      torch.from_numpy(rgb).permute(0, 3, 1, 2),
      size=(size_out, size_out),
      mode="bilinear",
      align_corners=False,
    )
    .permute(0, 2, 3, 1)
    .numpy()
  )
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  np.testing.assert_array_equal(sdm.resize_images(jnp.asarray(rgb), size_in), rgb)


def test_image_size_is_the_unets_sample_size_times_the_vae_factor(tiny_sd):
  assert sdm.image_size(sdm.abstract_model("stable-diffusion-2-1-base")) == 512
  assert sdm.image_size(sdm.abstract_model("stable-diffusion-2-1")) == 768
  assert sdm.image_size(prior.load_stable_diffusion(tiny_sd.path)) == 128


def test_broken_json_in_a_model_folder_is_named(tiny_sd, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(tiny_sd.path, folder)
  (folder / "unet" / "config.json").write_text('{"sample_size": 16,')
  with pytest.raises(ValueError, match=r"unet/config.json is not valid JSON"):
    prior.load_stable_diffusion(str(folder))
