"""A tiny random Stable Diffusion 2.x in diffusers' folder layout, for tests.

`build_tiny_sd` builds the model with diffusers' and transformers' PyTorch
classes (the same block types, linear attention projections and per-block head
counts as SD 2.x, but 32/64 channels), a tiny offline CLIP BPE tokenizer and a
DDPM scheduler config, and saves everything the way `save_pretrained` does on
the hub (safetensors weights):

    path/model_index.json
    path/unet/{config.json, diffusion_pytorch_model.safetensors}
    path/vae/{config.json, diffusion_pytorch_model.safetensors}
    path/text_encoder/{config.json, model.safetensors}
    path/tokenizer/{vocab.json, merges.txt, tokenizer_config.json, ...}
    path/scheduler/scheduler_config.json

The VAE downsamples by 8 like SD's, so 64x128 images give 8x16 latents. Every
1-D weight (norm scales, biases) is perturbed away from its default so that a
swapped or dropped norm parameter in a conversion cannot go unnoticed.

Fixtures (session scoped, each model built once per session even when several
test modules import them): `tiny_sd` / `tiny_sd_v` return a `TinySD` (folder and
torch modules) for an epsilon / v-prediction model; `tiny_sd_dir` the epsilon
model's folder.
"""

import json
import os
from typing import NamedTuple

import pytest

# Channel counts are multiples of 32 because diffusers' Flax UNet hard-codes 32
# GroupNorm groups.
UNET_CONFIG = {
  "sample_size": 16,
  "in_channels": 4,
  "out_channels": 4,
  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
  "attention_head_dim": (2, 4),  # SD 2.x style: a list of head counts.
  "cross_attention_dim": 32,
  "use_linear_projection": True,
  "norm_num_groups": 32,
}
VAE_CONFIG = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",) * 4,
  "up_block_types": ("UpDecoderBlock2D",) * 4,
  "block_out_channels": (32, 32, 64, 64),
  "layers_per_block": 1,
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 64,
}
TEXT_CONFIG = {
  "hidden_size": 32,
  "intermediate_size": 64,
  "num_attention_heads": 2,
  "num_hidden_layers": 2,
  "max_position_embeddings": 77,
  "hidden_act": "gelu",  # SD 2.x (OpenCLIP ViT-H) uses exact gelu.
  "bos_token_id": 0,
  "eos_token_id": 2,
  "pad_token_id": 1,
}
SCHEDULER_CONFIG = {
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "num_train_timesteps": 1000,
  "clip_sample": False,
  "steps_offset": 1,  # As SD 2.x (the pipeline warns about 0).
}
# BPE merges of the tiny tokenizer (the first line of merges.txt is a header).
_MERGES = (
  "a n",
  "t h",
  "th e</w>",
  "o n</w>",
  "a r",
  "ar e</w>",
  "i n",
  "in g</w>",
  "c h",
  "ch a",
  "cha i",
  "chai r</w>",
)


class TinySD(NamedTuple):
  """A saved tiny Stable Diffusion and the torch modules it was saved from."""

  path: str
  unet: "torch.nn.Module"
  vae: "torch.nn.Module"
  text_encoder: "torch.nn.Module"
  tokenizer: "transformers.CLIPTokenizer"
  scheduler: "diffusers.DDPMScheduler"


def _tiny_tokenizer(folder: str):
  """A CLIPTokenizer over the 256 byte symbols, a few merges and the specials."""
  from transformers import CLIPTokenizer
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  symbols = list(bytes_to_unicode().values())
  merged = ["".join(m.split(" ")) for m in _MERGES]
  tokens = symbols + [s + "</w>" for s in symbols] + merged
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  vocab_file = os.path.join(folder, "vocab.json")
  merges_file = os.path.join(folder, "merges.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
  # SD 2.x pads with "!" rather than with the end token.
  tokenizer = CLIPTokenizer(vocab_file, merges_file, pad_token="!", model_max_length=77)
  tokenizer.save_pretrained(folder)
  return tokenizer


def _perturb_vectors(module, generator, scale: float = 0.1) -> None:
  """Adds N(0, scale^2) noise to every 1-D parameter (norm scales, biases)."""
  import torch

  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(scale * torch.randn(p.shape, generator=generator))


def build_tiny_sd(path: str, prediction_type: str = "epsilon", seed: int = 0) -> TinySD:
  """Builds, saves (safetensors, diffusers layout) and returns a tiny SD 2.x.

  Args:
    path: folder to write; created if missing.
    prediction_type: "epsilon" or "v_prediction" (the v model also sets
      upcast_attention like SD 2.1 768).
    seed: torch seed of the random weights.

  Returns:
    TinySD with the folder and the torch modules in eval mode (float32, CPU).
  """
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel

  os.makedirs(path, exist_ok=True)
  generator = torch.Generator().manual_seed(seed)
  tokenizer = _tiny_tokenizer(os.path.join(path, "tokenizer"))

  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**UNET_CONFIG, upcast_attention=prediction_type == "v_prediction")
  vae = AutoencoderKL(**VAE_CONFIG)
  text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), **TEXT_CONFIG))
  for module in (unet, vae, text_encoder):
    _perturb_vectors(module, generator)
    module.eval()
  scheduler = DDPMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type)

  unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
  vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
  text_encoder.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
  scheduler.save_pretrained(os.path.join(path, "scheduler"))
  with open(os.path.join(path, "model_index.json"), "w") as f:
    json.dump(
      {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
      },
      f,
      indent=2,
    )
  return TinySD(path, unet, vae, text_encoder, tokenizer, scheduler)


# One build per prediction type per session, whichever module asks first;
# different seeds so the two models do not share weights.
PREDICTION_SEEDS = {"epsilon": 0, "v_prediction": 1}
_BUILT: dict[str, TinySD] = {}


def _cached(tmp_path_factory, prediction_type: str) -> TinySD:
  if prediction_type not in _BUILT:
    folder = str(tmp_path_factory.mktemp(f"tiny_sd_{prediction_type}"))
    seed = PREDICTION_SEEDS[prediction_type]
    _BUILT[prediction_type] = build_tiny_sd(folder, prediction_type, seed)
  return _BUILT[prediction_type]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> TinySD:
  """The tiny epsilon-prediction model (folder and torch modules)."""
  return _cached(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> TinySD:
  """The tiny v-prediction model (folder and torch modules)."""
  return _cached(tmp_path_factory, "v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_sd) -> str:
  """Folder of the tiny epsilon-prediction model, diffusers layout."""
  return tiny_sd.path
