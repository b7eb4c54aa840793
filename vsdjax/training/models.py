"""Builds what a config asks for: the representation, the frozen prior and eps_phi.

`build(config, key)` returns (models, frozen):
  models: Models, the static parts (closed over by jit);
  frozen: the arrays the step reads but never updates, passed to the jitted
    step as an argument (never baked in as constants):
      'prior':    the prior's arrays (prior/sd_prior.py, prior/analytic/__init__.py)
      'phi_base': eps_phi's base UNet params ({} for SDS)
      'phi_emb':  [L, D] eps_phi's text conditioning: the prompt without a view
      'representation': the representation's data() ({'shared', 'particle'})
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import cameras, checks, console, prior as prior_lib, representations
from vsdjax.guidance import eps_phi as eps_phi_lib
from vsdjax.prior import analytic, sd_prior, stable_diffusion
from vsdjax.prior.analytic import shapes
from vsdjax.prior.base import Prior
from vsdjax.training import stages

# Text conditioning of the tiny eps_phi UNet used with the analytic prior (a
# single zero token: the analytic prior has one prompt).
_TINY_CROSS_DIM = 32


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """Static parts of a run (hashed by identity).

  Attributes:
    representation: what a particle is (representations.Representation).
    prior: the frozen prior (prior.base.Prior); its arrays are frozen['prior'].
    eps_phi: eps_phi_lib.EpsPhi, None for SDS.
    batch_with_prior: whether the step runs the prior's CFG pair and eps_phi's
      target as one UNet call (`EpsPhi.predict_eps_with_base`): eps_phi is LoRA on
      the prior's own UNet (eps_phi.base "prior") and eps_phi.batch_with_prior.
  """

  representation: representations.Representation
  prior: Prior
  eps_phi: eps_phi_lib.EpsPhi | None = None
  batch_with_prior: bool = False


def tiny_unet_config(channels, size: int, in_channels: int = 3) -> dict:
  """Config of a small diffusers UNet for pixel-space eps_phi (analytic prior).

  One level per entry of `channels`, attention only on the coarsest (cheap). Each width
  must be a multiple of 32 and at least 64: diffusers' Flax GroupNorm has 32
  groups, and with 32 channels every channel is its own group, so the
  normalisation removes the time (and camera) embedding's per-channel shift.
  """
  channels = tuple(int(c) for c in channels)
  if not channels or any(c < 64 or c % 32 for c in channels):
    raise ValueError(
      "eps_phi.tiny_channels must be widths >= 64 that are multiples "
      f"of 32 (GroupNorm has 32 groups), got {channels}"
    )
  n = len(channels)
  return {
    "sample_size": size,
    "in_channels": in_channels,
    "out_channels": in_channels,
    "down_block_types": ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
    "block_out_channels": list(channels),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": _TINY_CROSS_DIM,
    "use_linear_projection": True,
  }


def prior_dtype(name: str, backend: str | None = None, compute_capability=None) -> jnp.dtype:
  """The frozen prior's dtype for config field prior.dtype ("auto", "float32", "bfloat16").

  "auto" is bfloat16 on TPUs and GPUs, float32 on the CPU and on GPUs of compute
  capability below 8.0 (a T4: XLA has no bfloat16 dot there), decided by
  `backend` (default jax.default_backend()) and `compute_capability` (default
  the first device's): the same on every run of one kind of device, so a resumed
  run gets the dtype it started with unless it moved to another kind.
  """
  if name == "auto":
    backend = backend or jax.default_backend()
    if backend == "gpu" and compute_capability is None:
      compute_capability = getattr(jax.devices()[0], "compute_capability", None)
    name = "float32" if backend == "cpu" or _before_ampere(compute_capability) else "bfloat16"
  return jnp.dtype(name)


def _before_ampere(compute_capability) -> bool:
  """Whether a CUDA compute capability ("7.5") is below 8.0; False for None or a ROCm "gfx90a"."""
  try:
    return float(compute_capability) < 8.0
  except (TypeError, ValueError):
    return False


def _load(field: str, name: str, dtype) -> stable_diffusion.StableDiffusion:
  """Loads the model that config field `field` names, or raises ModelLoadError."""
  console.say(f"loading {name} ({field}, {jnp.dtype(dtype).name}) ...")
  try:
    return prior_lib.load_stable_diffusion(name, dtype=dtype)
  except (OSError, ValueError) as e:
    raise checks.ModelLoadError(
      f"config field {field}={name!r}: {e} (set it with --config.{field}=/path/to/folder)"
    ) from e


def _view_prompts(config) -> list:
  return [
    cameras.view_prompt(config.prompt, i) if config.guidance.view_prompts else config.prompt
    for i in range(len(cameras.VIEW_NAMES))
  ]


def _phi(config, unet, alphas_cumprod, prediction_type: str) -> eps_phi_lib.EpsPhi:
  """eps_phi on `unet` (LoRA + camera MLP, or all weights) with its base's schedule."""
  e = config.eps_phi
  spec = eps_phi_lib.EpsPhiSpec(
    mode=e.mode,
    rank=e.rank,
    alpha=e.alpha,
    camera_dropout=e.camera_dropout,
    attention=config.prior.attention,
  )
  return eps_phi_lib.EpsPhi(
    unet=unet, spec=spec, alphas_cumprod=np.asarray(alphas_cumprod), prediction_type=prediction_type
  )


def build(config, key: jax.Array):
  """(Models, frozen) for a validated `config` (checks.validate_config).

  Loads Stable Diffusion first, so a missing model fails at start
  (checks.ModelLoadError naming the config field).
  """
  vsd = config.guidance.mode == "vsd"
  representation = representations.make(config, stages.previous(config))
  frozen = {"phi_base": {}, "representation": representation.data()}
  phi = None
  if config.prior.kind == "stable_diffusion":
    sd = _load("prior.name", config.prior.name, prior_dtype(config.prior.dtype))
    # [6, 77, D]: the 4 view prompts, the prompt alone (eps_phi's: threestudio's VSD guidance
    # gives the LoRA model the view-independent prompt) and the empty one.
    emb = prior_lib.encode_prompts(sd, _view_prompts(config) + [config.prompt, ""])
    sd = dataclasses.replace(sd, text_params={}, attention=config.prior.attention)
    frozen.update(prior={"sd": sd, "emb_cond": emb[:4], "emb_uncond": emb[5]}, phi_emb=emb[4])
    # The static copy keeps the modules and the schedule, not the weights.
    prior = sd_prior.SDPrior(dataclasses.replace(sd, unet_params={}, vae_params={}))
    if vsd:
      base = config.eps_phi.base
      phi_sd = sd if base == "prior" else _load("eps_phi.base", base, jnp.float32)
      frozen["phi_base"] = phi_sd.unet_params
      phi = _phi(config, phi_sd.unet, phi_sd.alphas_cumprod, phi_sd.prediction_type)
  else:
    refs = shapes.parse_references(config.prior.references)
    mixture = prior_lib.make_prior([shapes.component_name(r) for r in refs], config.prior.sigma_ref)
    cond = prior_lib.encode_prompts(mixture, [config.prompt])[0]  # [K]
    frozen.update(
      prior={
        "emb_cond": jnp.tile(cond[None], (len(cameras.VIEW_NAMES), 1)),
        "emb_uncond": prior_lib.encode_prompts(mixture, [""])[0],
      },
      phi_emb=jnp.zeros((1, _TINY_CROSS_DIM)),
    )
    prior = analytic.Analytic(mixture, refs, config.prior.reference_render)
    if vsd:
      unet = stable_diffusion.unet_from_config(
        tiny_unet_config(config.eps_phi.tiny_channels, config.render.resolution)
      )
      frozen["phi_base"] = unet.init_weights(key)
      phi = _phi(config, unet, mixture.alphas_cumprod, "epsilon")
  return Models(representation, prior, phi, _batch_with_prior(config)), frozen


def _batch_with_prior(config) -> bool:
  """Models.batch_with_prior for a validated config."""
  e = config.eps_phi
  return (
    config.guidance.mode == "vsd"
    and config.prior.kind == "stable_diffusion"
    and e.base == "prior"
    and e.mode == "lora"
    and e.batch_with_prior
  )


def _builtin(field: str, name: str) -> str:
  builtin = os.path.basename(os.path.normpath(name))
  if builtin not in stable_diffusion.BUILTIN_CONFIGS:
    raise checks.ConfigError(
      f"config field {field}={name!r}: build_abstract knows only the "
      f"shipped architectures {stable_diffusion.BUILTIN_CONFIGS}"
    )
  return builtin


def build_abstract(config, previous=None):
  """(Models, frozen) as `build` returns them for Stable Diffusion, without weights.

  The architectures are the shipped configs named by the last part of
  prior.name and eps_phi.base ("stabilityai/stable-diffusion-2-1-base" ->
  stable-diffusion-2-1-base; eps_phi.base may be "prior"). Params and
  embeddings in `frozen` are jax.ShapeDtypeStruct, so the train step of the
  real models can be traced (jax.eval_shape) or compiled on any machine.
  `previous` (stages.previous's pairs) stands in for the runs of init_from;
  None reads them.
  """
  if config.prior.kind != "stable_diffusion":
    raise checks.ConfigError("config field prior.kind: build_abstract is for 'stable_diffusion'")
  sd = stable_diffusion.abstract_model(
    _builtin("prior.name", config.prior.name), prior_dtype(config.prior.dtype)
  )
  sd = dataclasses.replace(sd, attention=config.prior.attention)
  n_views, n_tokens, width = len(cameras.VIEW_NAMES), 77, sd.unet.cross_attention_dim
  emb = jax.ShapeDtypeStruct((n_views, n_tokens, width), jnp.float32)
  frozen = {
    "prior": {
      "sd": sd,
      "emb_cond": emb,
      "emb_uncond": jax.ShapeDtypeStruct((n_tokens, width), jnp.float32),
    },
    "phi_base": {},
    "phi_emb": jax.ShapeDtypeStruct((n_tokens, width), jnp.float32),
  }
  if previous is None:
    previous = stages.previous(config)
  representation = representations.make(config, previous)
  frozen["representation"] = representation.data()
  phi = None
  if config.guidance.mode == "vsd":
    base = config.eps_phi.base
    phi_sd = (
      sd
      if base == "prior"
      else stable_diffusion.abstract_model(_builtin("eps_phi.base", base), jnp.float32)
    )
    frozen["phi_base"] = phi_sd.unet_params
    phi = _phi(config, phi_sd.unet, phi_sd.alphas_cumprod, phi_sd.prediction_type)
  prior = sd_prior.SDPrior(dataclasses.replace(sd, unet_params={}, vae_params={}))
  return Models(representation, prior, phi, _batch_with_prior(config)), frozen
