"""Stable Diffusion (2.x) as pure functions: diffusers' Flax UNet and VAE, Flax CLIP.

`load_stable_diffusion` reads a folder in diffusers' layout (or a hub id when
online): every component's own config, weights as safetensors (converted from
PyTorch names by `convert.py`, no torch needed) or as Flax msgpack, the CLIP
tokenizer and the scheduler's noise schedule. Pickle files (`*.bin`) are never
loaded. The result, a `StableDiffusion`, is a pytree (params as leaves,
modules static) that jitted code closes over or, better for the real model,
takes as an argument; the functions below take the UNet params explicitly (so
LoRA can differentiate them) and read the frozen VAE / text params from it.

Conventions:
  - latents are NCHW [B, 4, h, w] and scaled by the VAE's `scaling_factor`
    (0.18215 for SD 2.x), as diffusers' pipelines feed them to the UNet;
  - images are NHWC [B, H, W, 3] RGB in [0, 1], H = 8 h, W = 8 w;
  - timesteps are integers [B] in [0, 1000); `alphas_cumprod` is abar_t;
  - text embeddings [B, 77, D] are the CLIP text encoder's last hidden state
    (after its final layer norm; SD 2.x configs already drop the last OpenCLIP
    layer), exactly what `StableDiffusionPipeline.encode_prompt` returns;
  - outputs are float32 whatever the compute dtype (float32 or bfloat16).

diffusers' Flax GEGLU uses the tanh approximation of GELU while the PyTorch
models (and so the published weights) use the exact one; the UNet is applied
with a method interceptor that restores the exact GELU, which is what makes the
outputs match PyTorch to float32 precision. The Flax attention does not honour
`upcast_attention` (SD 2.1 768): irrelevant in float32; in bfloat16 diffusers'
softmax runs in bfloat16 (no overflow, bfloat16 has float32's range).

The UNet's attention (diffusers' `FlaxAttention`) is by default replaced, with
another method interceptor (`intercept_attention`), by `jax.nn.dot_product_attention`
on the module's own projections: cuDNN's fused kernel on a GPU in bfloat16,
XLA's attention elsewhere; its logits and softmax are float32 in bfloat16 too.
`StableDiffusion.attention` chooses it ("fused", "xla" or "diffusers", see
`ATTENTIONS`); eps_phi's UNet takes the same interceptor.
"""

from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any

import diffusers.utils.logging

# Drops diffusers' "Flax classes are deprecated" line, logged at import and per
# module trace, at the handler of diffusers' root logger (every module's records
# reach it); pyproject.toml pins diffusers<0.40, which still has them.
for _handler in diffusers.utils.logging.get_logger("diffusers").handlers:
  _handler.addFilter(
    lambda record: not record.getMessage().startswith("Flax classes are deprecated")
  )

from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: E402
from diffusers.models.attention_flax import FlaxAttention, FlaxGEGLU
import flax.linen as nn
import flax.serialization
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel
from transformers.modeling_flax_utils import ACT2FN

from vsdjax.prior import convert, schedule

# The real SD 2.1 (768, v) and SD 2.1-base (512, epsilon) configs, no weights.
CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")
BUILTIN_CONFIGS = ("stable-diffusion-2-1-base", "stable-diffusion-2-1")
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = (jnp.float32, jnp.bfloat16)
# The UNet's attention: jax.nn.dot_product_attention with cuDNN where it runs
# (GPU, bfloat16 / float16) and XLA elsewhere; XLA's always; diffusers' own.
ATTENTIONS = ("fused", "xla", "diffusers")
# What to download for a hub id: configs, tokenizer, full-precision safetensors.
_HUB_PATTERNS = (
  "model_index.json",
  "*/config.json",
  "scheduler/*.json",
  "tokenizer/*",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/model.safetensors",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Weight file stems: (PyTorch safetensors stem, Flax msgpack file).
_WEIGHT_FILES = {
  "unet": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
  "vae": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
  "text_encoder": ("model", "flax_model.msgpack"),
}

# UNet / VAE config fields the Flax classes do not read (or read but
# predict_raw / encode_images do not feed): accepted only with the value the
# Flax architecture implements (the diffusers PyTorch default).
_UNET_FIXED = {
  "act_fn": "silu",
  "addition_embed_type": None,
  "attention_type": "default",
  "center_input_sample": False,
  "class_embed_type": None,
  "class_embeddings_concat": False,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "cross_attention_norm": None,
  "downsample_padding": 1,
  "dual_cross_attention": False,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "mid_block_only_cross_attention": None,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-5,
  "norm_num_groups": 32,
  "num_attention_heads": None,
  "num_class_embeds": None,
  "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": False,
  "resnet_time_scale_shift": "default",
  "reverse_transformer_layers_per_block": None,
  "time_cond_proj_dim": None,
  "time_embedding_act_fn": None,
  "time_embedding_dim": None,
  "time_embedding_type": "positional",
  "timestep_post_act": None,
}
# Read by the PyTorch class only, with no effect on float32 outputs.
_UNET_IGNORED = ("upcast_attention",)
_UNET_BLOCKS = {
  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
_VAE_FIXED = {
  "act_fn": "silu",
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
}
_VAE_IGNORED = ("force_upcast",)
_VAE_BLOCKS = {
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
  """The stateless parts of a StableDiffusion, hashed by identity.

  A part is None where a caller (e.g. a benchmark) builds only the others.

  Attributes:
    unet: FlaxUNet2DConditionModel.
    vae: FlaxAutoencoderKL.
    text_encoder: transformers' FlaxCLIPTextModule.
    tokenizer: transformers' CLIPTokenizer.
  """

  unet: FlaxUNet2DConditionModel | None
  vae: FlaxAutoencoderKL | None
  text_encoder: nn.Module | None
  tokenizer: CLIPTokenizer | None


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("unet_params", "vae_params", "text_params", "alphas_cumprod"),
  meta_fields=("modules", "prediction_type", "scaling_factor", "dtype", "name", "attention"),
)
@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """A loaded Stable Diffusion: Flax modules, their params and the schedule.

  A pytree: the params and the schedule are its leaves, everything else is
  static. Close over it in jitted code (fine for small models), or, for the
  real model, pass it as an argument so its params stay device buffers instead
  of becoming constants of the compiled program:

    step = jax.jit(lambda sd, x: encode_images(sd, x))
    step(sd, x)

  Attributes:
    modules: Modules (unet, vae, text_encoder, tokenizer; also readable as
      sd.unet, sd.vae, sd.text_encoder, sd.tokenizer).
    unet_params: UNet params, `dtype`.
    vae_params: VAE params, `dtype`.
    text_params: CLIP text params, `dtype`.
    alphas_cumprod: [T] float32 abar_t of the scheduler config.
    prediction_type: "epsilon" or "v_prediction".
    scaling_factor: latent scale of the VAE config.
    dtype: compute and param dtype, jnp.float32 or jnp.bfloat16.
    name: the folder or hub id it was loaded from.
    attention: the UNet's attention, one of ATTENTIONS (see intercept_attention).
  """

  modules: Modules
  unet_params: Any
  vae_params: Any
  text_params: Any
  alphas_cumprod: jax.Array
  prediction_type: str
  scaling_factor: float
  dtype: Any
  name: str
  attention: str = "fused"

  @property
  def unet(self) -> FlaxUNet2DConditionModel:
    return self.modules.unet

  @property
  def vae(self) -> FlaxAutoencoderKL:
    return self.modules.vae

  @property
  def text_encoder(self) -> nn.Module:
    return self.modules.text_encoder

  @property
  def tokenizer(self) -> CLIPTokenizer:
    return self.modules.tokenizer


# ----------------------------------------------------------------------------
# Building modules from configs.


def _check_config(
  config: Mapping,
  module_class: type,
  fixed: Mapping,
  ignored: Sequence[str],
  blocks: Mapping,
  what: str,
) -> None:
  """Raises ValueError naming each config field the Flax class cannot build.

  Fields of `module_class` are free unless `fixed` pins them; other fields
  must be in `fixed` (with that value) or in `ignored`.
  """
  known = (set(_module_kwargs(config, module_class)) - set(fixed)) | set(ignored)
  problems = []
  for key, value in config.items():
    if key.startswith("_") or key in known:
      continue
    if key not in fixed:
      problems.append(f"unknown field {key}={value!r}")
    elif value != fixed[key]:
      problems.append(f"{key}={value!r} (only {fixed[key]!r} is supported)")
  for key, allowed in blocks.items():
    bad = [b for b in config.get(key, ()) if b not in allowed]
    if bad:
      problems.append(f"{key} has {bad} (supported: {list(allowed)})")
  if problems:
    raise ValueError(f"{what}: config this code cannot build: " + "; ".join(problems))


def _module_kwargs(config: Mapping, module_class: type) -> dict:
  """The config fields the Flax class takes, lists made hashable tuples."""
  fields = {f.name for f in dataclasses.fields(module_class)}
  fields -= {"parent", "name", "dtype"}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}


def _check_dtype(dtype: Any) -> Any:
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype={dtype!r} is not a dtype") from e
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype} is not supported; use float32 or bfloat16")
  return dtype.type


def unet_from_config(
  config: Mapping, dtype: Any = jnp.float32, what: str = "unet config"
) -> FlaxUNet2DConditionModel:
  """Builds diffusers' Flax UNet from a UNet2DConditionModel config dict.

  Args:
    config: the fields of `unet/config.json`.
    dtype: compute dtype, jnp.float32 or jnp.bfloat16.
    what: names the config in error messages.

  Returns:
    The module (no params; see `abstract_params`).

  Raises:
    ValueError: for a field or block type the Flax class does not implement.
  """
  dtype = _check_dtype(dtype)
  _check_config(config, FlaxUNet2DConditionModel, _UNET_FIXED, _UNET_IGNORED, _UNET_BLOCKS, what)
  if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
    raise ValueError(
      f"{what}: config this code cannot build: mid_block_type={config['mid_block_type']!r}"
    )
  return FlaxUNet2DConditionModel(**_module_kwargs(config, FlaxUNet2DConditionModel), dtype=dtype)


def vae_from_config(
  config: Mapping, dtype: Any = jnp.float32, what: str = "vae config"
) -> FlaxAutoencoderKL:
  """Builds diffusers' Flax AutoencoderKL from its config dict (see unet_from_config)."""
  dtype = _check_dtype(dtype)
  _check_config(config, FlaxAutoencoderKL, _VAE_FIXED, _VAE_IGNORED, _VAE_BLOCKS, what)
  return FlaxAutoencoderKL(**_module_kwargs(config, FlaxAutoencoderKL), dtype=dtype)


def text_encoder_from_config(
  config: Mapping, dtype: Any = jnp.float32, what: str = "text_encoder config"
) -> nn.Module:
  """Builds transformers' Flax CLIP text module from a CLIPTextModel config dict."""
  dtype = _check_dtype(dtype)
  model_type = config.get("model_type", "clip_text_model")
  if model_type != "clip_text_model":
    raise ValueError(
      f"{what}: config this code cannot build: model_type="
      f"{model_type!r} (expected 'clip_text_model')"
    )
  if config.get("hidden_act", "quick_gelu") not in ACT2FN:
    raise ValueError(f"{what}: config this code cannot build: hidden_act={config['hidden_act']!r}")
  text_config = CLIPTextConfig.from_dict(dict(config))
  return FlaxCLIPTextModel.module_class(config=text_config, dtype=dtype)


def abstract_params(module: nn.Module) -> Any:
  """The param tree of a UNet, VAE or CLIP text module as jax.ShapeDtypeStruct.

  Uses `jax.eval_shape`: no memory is allocated, so the real architectures can
  be inspected on any machine. Params are float32 (the Flax param dtype).
  """
  key = jax.random.PRNGKey(0)
  if isinstance(module, (FlaxUNet2DConditionModel, FlaxAutoencoderKL)):
    return jax.eval_shape(module.init_weights, key)
  if isinstance(module, FlaxCLIPTextModel.module_class):
    ids = jnp.zeros((1, 1), jnp.int32)  # [B, L]
    return jax.eval_shape(lambda: module.init(key, ids, jnp.ones_like(ids), ids)["params"])
  raise ValueError(
    f"module must be a Flax UNet, VAE or CLIP text module, got {type(module).__name__}"
  )


def config_dir(name: str) -> str:
  """Folder of a shipped config set ("stable-diffusion-2-1-base" or "...-2-1")."""
  if name not in BUILTIN_CONFIGS:
    raise ValueError(f"name={name!r} is unknown; expected one of {BUILTIN_CONFIGS}")
  return os.path.join(CONFIGS_DIR, name)


def abstract_model(name: str, dtype: Any = jnp.float32) -> StableDiffusion:
  """A StableDiffusion of a shipped config set ("stable-diffusion-2-1-base" or
  "stable-diffusion-2-1") with abstract weights, for jax.eval_shape / compiling.

  UNet and VAE params are jax.ShapeDtypeStruct trees in `dtype` (what
  load_stable_diffusion would load); no text encoder or tokenizer (callers
  take embeddings as shapes too); the schedule is real.
  """
  dtype = _check_dtype(dtype)
  folder = config_dir(name)
  unet = unet_from_config(_read_json(os.path.join(folder, "unet", "config.json")), dtype)
  vae_config = _read_json(os.path.join(folder, "vae", "config.json"))
  vae = vae_from_config(vae_config, dtype)
  scheduler = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
  cast = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)
  return StableDiffusion(
    modules=Modules(unet, vae, None, None),
    unet_params=cast(abstract_params(unet)),
    vae_params=cast(abstract_params(vae)),
    text_params={},
    alphas_cumprod=jnp.asarray(schedule.alphas_cumprod(scheduler), jnp.float32),
    prediction_type=scheduler.get("prediction_type", "epsilon"),
    scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
    dtype=dtype,
    name=name,
  )


# ----------------------------------------------------------------------------
# Loading a folder.


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} is missing (a Stable Diffusion folder in "
      f"diffusers layout has {', '.join(SUBFOLDERS)})"
    )
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e


def _resolve_folder(name_or_path: str) -> str:
  """A local folder, downloading a hub id's configs and safetensors if needed."""
  if os.path.isdir(name_or_path):
    return name_or_path
  layout = "a local folder in diffusers layout (" + "/, ".join(SUBFOLDERS) + "/)"
  if os.path.exists(name_or_path):
    raise FileNotFoundError(f"{name_or_path} is a file; pass {layout}")
  if not _HUB_ID.fullmatch(name_or_path):
    raise FileNotFoundError(
      f"Stable Diffusion folder {name_or_path} does not exist; pass {layout} or a hub id"
    )
  try:
    return huggingface_hub.snapshot_download(name_or_path, allow_patterns=list(_HUB_PATTERNS))
  except Exception as e:  # Offline, unknown repo, gated repo, ...
    raise FileNotFoundError(
      f"{name_or_path} is not a local folder and could not be downloaded "
      f"from the Hugging Face hub ({type(e).__name__}: {e}). Without "
      f"internet, pass {layout}."
    ) from e


def _weight_files(folder: str, component: str) -> tuple[str, list[str]]:
  """("safetensors" | "msgpack", files) of a component, preferring float32."""
  sub = os.path.join(folder, component)
  if not os.path.isdir(sub):
    raise FileNotFoundError(
      f"{sub} is missing (a Stable Diffusion folder in "
      f"diffusers layout has {', '.join(SUBFOLDERS)})"
    )
  stem, msgpack = _WEIGHT_FILES[component]
  candidates = [
    ("safetensors", f"{stem}.safetensors"),
    ("msgpack", msgpack),
    ("safetensors", f"{stem}.fp16.safetensors"),
  ]
  for kind, name in candidates:
    path = os.path.join(sub, name)
    if os.path.isfile(path):
      return kind, [path]
    index = path + ".index.json"
    if kind == "safetensors" and os.path.isfile(index):
      shards = sorted(set(_read_json(index)["weight_map"].values()))
      return kind, [os.path.join(sub, s) for s in shards]
  if glob.glob(os.path.join(sub, "*.bin")):
    raise ValueError(
      f"{sub} holds only PyTorch pickle weights (*.bin), which vsdjax does "
      f"not load (unpickling runs arbitrary code). Convert them once to "
      f"safetensors, e.g. with diffusers: from_pretrained(...)."
      f"save_pretrained(..., safe_serialization=True)."
    )
  raise FileNotFoundError(
    f"{sub} has no weights: expected {stem}.safetensors, {msgpack} or {stem}.fp16.safetensors"
  )


def _cast(tree: Any, dtype: Any) -> Any:
  """Device arrays from a tree of host arrays, floating leaves cast to dtype."""

  def cast(x):
    x = np.asarray(x)
    return jnp.asarray(x, dtype if jnp.issubdtype(x.dtype, jnp.floating) else None)

  return jax.tree.map(cast, tree)


def _load_params(folder: str, component: str, module: nn.Module, dtype: Any) -> Any:
  """Reads, converts, checks and casts one component's weights."""
  kind, files = _weight_files(folder, component)
  target = abstract_params(module)
  what = ", ".join(files)
  if kind == "msgpack":
    with open(files[0], "rb") as f:
      tree = flax.serialization.msgpack_restore(f.read())
    convert.check_tree(tree, target, what=what)
  else:
    state_dict = {}
    for path in files:
      state_dict.update(load_file(path))
    tree = convert.convert_state_dict(
      state_dict, target, join_indices=component != "text_encoder", what=what
    )
  return _cast(tree, dtype)


def load_stable_diffusion(
  name_or_path: str | os.PathLike, dtype: Any = jnp.float32
) -> StableDiffusion:
  """Loads Stable Diffusion from a diffusers folder (or a hub id when online).

  Args:
    name_or_path: a folder with unet/, vae/, text_encoder/, tokenizer/ and
      scheduler/ as diffusers saves them, or a hub id such as
      "stabilityai/stable-diffusion-2-1-base" (downloads configs, tokenizer and
      safetensors; needs internet).
    dtype: jnp.float32 or jnp.bfloat16: params and compute. The schedule and
      every output stay float32.

  Returns:
    StableDiffusion. Never random weights: any missing or mismatched weight
    raises.

  Raises:
    FileNotFoundError: missing folder, sub-folder, config or weight file.
    ValueError: pickle-only weights, unknown prediction type or schedule, a
      config this code cannot build, weights that do not fit the config.
  """
  dtype = _check_dtype(dtype)
  name = os.fspath(name_or_path)
  folder = _resolve_folder(name)
  sub = lambda *p: os.path.join(folder, *p)

  scheduler_path = sub("scheduler", "scheduler_config.json")
  scheduler_config = _read_json(scheduler_path)
  prediction_type = scheduler_config.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(
      f"{scheduler_path}: prediction_type={prediction_type!r} is "
      f"not supported; expected one of {PREDICTION_TYPES}"
    )
  try:
    alphas_cumprod = schedule.alphas_cumprod(scheduler_config)
  except ValueError as e:
    raise ValueError(f"{scheduler_path}: {e}") from e

  for filename in ("vocab.json", "merges.txt"):
    if not os.path.isfile(sub("tokenizer", filename)):
      raise FileNotFoundError(f"{sub('tokenizer', filename)} is missing (the CLIP tokenizer files)")
  try:
    tokenizer = CLIPTokenizer.from_pretrained(sub("tokenizer"))
  except (OSError, ValueError, TypeError) as e:  # Broken tokenizer files.
    raise ValueError(
      f"{sub('tokenizer')}: the CLIP tokenizer cannot be read ({type(e).__name__}: {e})"
    ) from e

  unet_path = sub("unet", "config.json")
  unet = unet_from_config(_read_json(unet_path), dtype, what=unet_path)
  vae_path = sub("vae", "config.json")
  vae_config = _read_json(vae_path)
  vae = vae_from_config(vae_config, dtype, what=vae_path)
  text_path = sub("text_encoder", "config.json")
  text_encoder = text_encoder_from_config(_read_json(text_path), dtype, what=text_path)
  return StableDiffusion(
    modules=Modules(unet, vae, text_encoder, tokenizer),
    unet_params=_load_params(folder, "unet", unet, dtype),
    vae_params=_load_params(folder, "vae", vae, dtype),
    text_params=_load_params(folder, "text_encoder", text_encoder, dtype),
    alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    prediction_type=prediction_type,
    scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
    dtype=dtype,
    name=name,
  )


# ----------------------------------------------------------------------------
# Pure functions.


def exact_geglu(next_fun, args, kwargs, context):
  """Method interceptor: diffusers' Flax GEGLU with PyTorch's exact GELU."""
  if isinstance(context.module, FlaxGEGLU) and context.method_name == "__call__":
    hidden = context.module.proj(args[0])  # [B, L, 8 C]
    linear, gate = jnp.split(hidden, 2, axis=-1)  # [B, L, 4 C] each
    return linear * nn.gelu(gate, approximate=False)
  return next_fun(*args, **kwargs)


def _attention_implementation(query: jax.Array, attention: str) -> str:
  """The jax.nn.dot_product_attention implementation of `attention`: "cudnn" or "xla"."""
  half = query.dtype in (jnp.bfloat16, jnp.float16)
  return "cudnn" if attention == "fused" and half and jax.default_backend() == "gpu" else "xla"


def _dot_product_attention(module: FlaxAttention, attention: str, hidden, context=None, **kwargs):
  """FlaxAttention.__call__ through jax.nn.dot_product_attention.

  The module's own projections (query, key, value, proj_attn: merged LoRA
  params and lora.intercept apply as they do to the original) and dropout;
  softmax(q k^T * scale) v with heads split as [B, T, N, H], whatever the
  module's split_head_dim.

  Args:
    module: the bound FlaxAttention.
    attention: "fused" (cuDNN where jax accepts it, else XLA) or "xla".
    hidden: [B, T, C] queries' input.
    context: [B, S, D] keys' and values' input (None: hidden, self-attention).
    **kwargs: `deterministic` (dropout), as FlaxAttention takes it.

  Returns:
    [B, T, C] in the module's dtype.
  """
  context = hidden if context is None else context
  batch, heads = hidden.shape[0], (module.heads, module.dim_head)
  q = module.query(hidden).reshape(batch, -1, *heads)  # [B, T, N, H]
  k = module.key(context).reshape(batch, -1, *heads)  # [B, S, N, H]
  v = module.value(context).reshape(batch, -1, *heads)  # [B, S, N, H]
  implementation = _attention_implementation(q, attention)
  try:
    out = jax.nn.dot_product_attention(q, k, v, scale=module.scale, implementation=implementation)
  except NotImplementedError:  # Shapes or a GPU that jax's cuDNN checks refuse.
    out = jax.nn.dot_product_attention(q, k, v, scale=module.scale, implementation="xla")
  out = module.proj_attn(out.reshape(batch, -1, module.heads * module.dim_head))  # [B, T, C]
  return module.dropout_layer(out, deterministic=kwargs.get("deterministic", True))


def intercept_attention(attention: str) -> contextlib.AbstractContextManager:
  """A context in which diffusers' Flax UNets run the chosen attention.

  Wrap a UNet's `apply` in it (`with intercept_attention("fused"): unet.apply(...)`);
  nests with other method interceptors.

  Args:
    attention: "fused" (jax.nn.dot_product_attention: cuDNN on a GPU in
      bfloat16 / float16 where jax accepts the shapes, XLA elsewhere), "xla"
      (jax.nn.dot_product_attention's XLA version) or "diffusers" (the
      module's own einsums, unchanged).

  Raises:
    ValueError: for another name.
  """
  if attention not in ATTENTIONS:
    raise ValueError(f"attention={attention!r} is unknown; expected one of {ATTENTIONS}")
  if attention == "diffusers":
    return contextlib.nullcontext()

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, FlaxAttention) and context.method_name == "__call__":
      return _dot_product_attention(context.module, attention, *args, **kwargs)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def encode_prompts(sd: StableDiffusion, prompts: str | Sequence[str]) -> jax.Array:
  """CLIP text embeddings as StableDiffusionPipeline computes them.

  Args:
    sd: the model.
    prompts: B strings (a single string counts as one prompt); "" gives the
      unconditional embedding of classifier-free guidance.

  Returns:
    [B, 77, D] float32 last hidden state (D = 1024 for SD 2.x).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
  tokens = sd.tokenizer(
    prompts,
    padding="max_length",
    max_length=sd.tokenizer.model_max_length,
    truncation=True,
    return_tensors="np",
  )
  ids = jnp.asarray(tokens.input_ids, jnp.int32)  # [B, 77]
  # Like diffusers: the padding mask is used only if the config asks for it.
  if getattr(sd.text_encoder.config, "use_attention_mask", False):
    mask = jnp.asarray(tokens.attention_mask, jnp.int32)
  else:
    mask = jnp.ones_like(ids)
  return _encode_tokens(sd, ids, mask)


@jax.jit
def _encode_tokens(sd: StableDiffusion, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, L] token ids and attention mask -> [B, L, D] float32 hidden states."""
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)  # [B, L]
  out = sd.text_encoder.apply({"params": sd.text_params}, ids, mask, positions)
  return out.last_hidden_state.astype(jnp.float32)


def _check_unet_inputs(sd: StableDiffusion, x_t: jax.Array, t: jax.Array, emb: jax.Array) -> None:
  """Shape checks of predict_* (static, so free under jit)."""
  channels = sd.unet.in_channels
  if x_t.ndim != 4 or x_t.shape[1] != channels:
    raise ValueError(f"x_t must be [B, {channels}, h, w], got {x_t.shape}")
  if t.shape != x_t.shape[:1] or not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(
      f"t must be [B] = [{x_t.shape[0]}] integers, got shape {t.shape} dtype {t.dtype}"
    )
  width = sd.unet.cross_attention_dim
  if emb.ndim != 3 or emb.shape[0] != x_t.shape[0] or emb.shape[2] != width:
    raise ValueError(f"emb must be [B, L, {width}] with B = {x_t.shape[0]}, got {emb.shape}")
  factor = 2 ** (len(sd.unet.block_out_channels) - 1)
  if x_t.shape[2] % factor or x_t.shape[3] % factor:
    raise ValueError(f"x_t's height and width must be multiples of {factor}, got {x_t.shape}")


def predict_raw(
  sd: StableDiffusion, unet_params: Any, x_t: jax.Array, t: jax.Array, emb: jax.Array
) -> jax.Array:
  """The UNet's output (eps or v, per `sd.prediction_type`).

  Args:
    sd: the model (closed over).
    unet_params: UNet params (sd.unet_params, or others of its shapes).
    x_t: [B, 4, h, w] noisy scaled latents.
    t: [B] integer timesteps.
    emb: [B, L, D] text embeddings (see encode_prompts).

  Returns:
    [B, 4, h, w] float32.
  """
  x_t, t, emb = jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(emb)
  _check_unet_inputs(sd, x_t, t, emb)
  with intercept_attention(sd.attention), nn.intercept_methods(exact_geglu):
    out = sd.unet.apply({"params": unet_params}, x_t.astype(sd.dtype), t, emb.astype(sd.dtype))
  return out.sample.astype(jnp.float32)


def predict_eps(
  sd: StableDiffusion, unet_params: Any, x_t: jax.Array, t: jax.Array, emb: jax.Array
) -> jax.Array:
  """The UNet's eps prediction, v converted by eps = s_t x_t + a_t v.

  Shapes as predict_raw: x_t [B, 4, h, w], t [B], emb [B, L, D] ->
  [B, 4, h, w] float32.
  """
  x_t = jnp.asarray(x_t, jnp.float32)
  output = predict_raw(sd, unet_params, x_t, t, emb)  # [B, 4, h, w]
  a_t, s_t = schedule.coefficients(sd.alphas_cumprod, t)  # [B] each
  return schedule.eps_from_output(output, x_t, a_t, s_t, sd.prediction_type)


def _vae_factor(sd: StableDiffusion) -> int:
  return 2 ** (len(sd.vae.block_out_channels) - 1)


def image_size(sd: StableDiffusion) -> int:
  """The image size the UNet was trained at: sample_size x the VAE factor (512 for 2.1-base)."""
  return int(sd.unet.sample_size) * _vae_factor(sd)


def resize_images(rgb: jax.Array, size: int) -> jax.Array:
  """Bilinear resize [B, H, W, C] -> [B, size, size, C], differentiable.

  Half-pixel centres and no antialiasing (PyTorch's F.interpolate(mode="bilinear",
  align_corners=False)). The identity when the size already matches.
  """
  if rgb.shape[1:3] == (size, size):
    return rgb
  return jax.image.resize(
    rgb, (rgb.shape[0], size, size, rgb.shape[3]), "bilinear", antialias=False
  )


def encode_images(sd: StableDiffusion, rgb: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """Scaled VAE latents of images; differentiable w.r.t. rgb.

  Args:
    sd: the model (closed over).
    rgb: [B, H, W, 3] in [0, 1], H and W multiples of 8.
    key: None for the posterior mean, else a PRNG key to sample the posterior.

  Returns:
    [B, 4, H / 8, W / 8] float32, times sd.scaling_factor.
  """
  rgb = jnp.asarray(rgb)
  factor = _vae_factor(sd)
  if (
    rgb.ndim != 4
    or rgb.shape[-1] != sd.vae.in_channels
    or rgb.shape[1] % factor
    or rgb.shape[2] % factor
  ):
    raise ValueError(
      f"rgb must be [B, H, W, {sd.vae.in_channels}] with H, W "
      f"multiples of {factor}, got {rgb.shape}"
    )
  x = (2.0 * rgb - 1.0).astype(sd.dtype)  # [B, H, W, 3] in [-1, 1]
  moments = sd.vae.apply(
    {"params": sd.vae_params}, x, method=lambda m, x: m.quant_conv(m.encoder(x))
  )
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # [B, h, w, 4]
  latents = mean
  if key is not None:
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))  # As diffusers clips.
    latents = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  return jnp.transpose(latents * sd.scaling_factor, (0, 3, 1, 2))


def decode_latents(sd: StableDiffusion, latents: jax.Array) -> jax.Array:
  """Images of scaled latents.

  Args:
    sd: the model (closed over).
    latents: [B, 4, h, w] scaled latents.

  Returns:
    [B, 8 h, 8 w, 3] float32 RGB clipped to [0, 1].
  """
  latents = jnp.asarray(latents)
  if latents.ndim != 4 or latents.shape[1] != sd.vae.latent_channels:
    raise ValueError(f"latents must be [B, {sd.vae.latent_channels}, h, w], got {latents.shape}")
  z = jnp.transpose(latents / sd.scaling_factor, (0, 2, 3, 1))  # [B, h, w, 4]
  x = sd.vae.apply(
    {"params": sd.vae_params},
    z.astype(sd.dtype),
    method=lambda m, z: m.decoder(m.post_quant_conv(z)),
  )
  return jnp.clip(x.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
