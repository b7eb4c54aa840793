"""Speed of the UNet's attention: diffusers' einsums against jax.nn.dot_product_attention.

One diffusers FlaxAttention at SD 2.1-base's shapes, random weights, per dtype
and attention, prints one JSON object per line with the compile time, the
median seconds over --repeats and XLA's temp memory of the forward and of the
forward + backward (gradients w.r.t. the input and the four projections, what
eps_phi's LoRA needs), and, for forwards, the largest error against diffusers'
float32 attention relative to its largest output:

  layers (--layers): self- and cross-attention (77 text tokens of width 1024)
  at 4096 tokens (64x64 latent, 320 channels, 5 heads of 64), 1024 tokens
  (640, 10 heads) and 256 tokens (1280, 20 heads);
  attentions (--attentions): "diffusers" (its einsums, heads folded into the
  batch), "diffusers-split" (its split_head_dim=True einsums), "xla" and
  "fused" (stable_diffusion.intercept_attention: jax.nn.dot_product_attention,
  XLA's, or cuDNN's on a GPU in bfloat16; on a CPU both are XLA's, so "xla"
  runs by default only on GPUs).

  --unet: the whole SD 2.1-base UNet forward (predict_raw) at --latent
  (64: 512 px) per attention, random weights.

  python benchmarks/attention.py                            # GPU: everything
  python benchmarks/attention.py --batch 1 --repeats 3      # CPU
  python benchmarks/attention.py --unet --layers none --dtypes bfloat16
"""

import argparse
import json
import os

from diffusers.models.attention_flax import FlaxAttention
import jax
import jax.numpy as jnp
import numpy as np

from random_weights import random_like
from vsdjax.prior import schedule, stable_diffusion as sdm
from xla_memory import measure, run_info

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# name: (query tokens, channels, heads, context tokens or None for self-attention).
LAYERS = {
  "self-4096": (4096, 320, 5, None),
  "cross-4096": (4096, 320, 5, 77),
  "self-1024": (1024, 640, 10, None),
  "cross-1024": (1024, 640, 10, 77),
  "self-256": (256, 1280, 20, None),
  "cross-256": (256, 1280, 20, 77),
}
CONTEXT_DIM = 1024  # SD 2.x's OpenCLIP text width.
ATTENTIONS = ("diffusers", "diffusers-split", "xla", "fused")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--layers",
    default="self-4096,cross-4096,self-1024,cross-1024",
    help="comma-separated, of " + ", ".join(LAYERS) + "; 'none' for none",
  )
  p.add_argument(
    "--attentions",
    default=None,
    help="comma-separated, of " + ", ".join(ATTENTIONS) + " (default: all; no 'xla' off GPUs)",
  )
  p.add_argument(
    "--dtypes", default="float32,bfloat16", help="comma-separated: " + ", ".join(DTYPES)
  )
  p.add_argument("--batch", type=int, default=2, help="batch (2: the prior's CFG pair)")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per program")
  p.add_argument("--unet", action="store_true", help="also the whole UNet forward")
  p.add_argument("--latent", type=int, default=64, help="UNet latent size (--unet)")
  p.add_argument("--max-temp-gib", type=float, default=None, help="skip programs needing more")
  args = p.parse_args()
  args.layers = [] if args.layers == "none" else args.layers.split(",")
  default = [a for a in ATTENTIONS if a != "xla" or jax.default_backend() == "gpu"]
  args.attentions = default if args.attentions is None else args.attentions.split(",")
  args.dtypes = args.dtypes.split(",")
  bad = (
    [x for x in args.layers if x not in LAYERS]
    + [x for x in args.attentions if x not in ATTENTIONS]
    + [x for x in args.dtypes if x not in DTYPES]
  )
  if bad or args.batch < 1 or args.repeats < 1:
    p.error(f"unknown {bad} or bad --batch / --repeats")
  return args


def _intercepted(kind: str):
  """The intercept_attention name of a benchmarked attention."""
  return "diffusers" if kind.startswith("diffusers") else kind


def layer_programs(layer: str, kind: str, dtype):
  """(module, forward, forward_backward) of one attention layer.

  forward(params, hidden, context) -> [B, T, C]; forward_backward(params,
  hidden, context, cotangent [B, T, C]) -> gradients w.r.t. (params, hidden).
  """
  _, channels, heads, _ = LAYERS[layer]
  module = FlaxAttention(
    query_dim=channels,
    heads=heads,
    dim_head=channels // heads,
    split_head_dim=kind == "diffusers-split",
    dtype=dtype,
  )

  def forward(params, hidden, context):
    with sdm.intercept_attention(_intercepted(kind)):
      return module.apply({"params": params}, hidden, context)

  def forward_backward(params, hidden, context, cotangent):
    loss = lambda p, h: jnp.vdot(forward(p, h, context).astype(jnp.float32), cotangent)
    return jax.grad(loss, argnums=(0, 1))(params, hidden)

  return module, forward, forward_backward


def layer_inputs(layer: str, batch: int, dtype) -> tuple:
  """(abstract params, hidden [B, T, C], context [B, S, D] or None, cotangent [B, T, C])."""
  tokens, channels, heads, context_tokens = LAYERS[layer]
  module = FlaxAttention(query_dim=channels, heads=heads, dim_head=channels // heads)
  context_shape = (1, context_tokens or 1, CONTEXT_DIM if context_tokens else channels)
  abstract = jax.eval_shape(
    lambda: module.init(
      jax.random.key(0), jnp.zeros((1, tokens, channels)), jnp.zeros(context_shape)
    )["params"]
  )
  rng = np.random.default_rng(1)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  hidden = draw(batch, tokens, channels).astype(dtype)
  context = draw(batch, context_tokens, CONTEXT_DIM).astype(dtype) if context_tokens else None
  return abstract, hidden, context, draw(batch, tokens, channels)


def rel_err(x: np.ndarray, reference: np.ndarray) -> float:
  """max |x - reference| / max |reference|."""
  return float(np.max(np.abs(x - reference)) / np.max(np.abs(reference)))


def bench_layer(args, layer: str, base: dict) -> None:
  tokens, channels, heads, context_tokens = LAYERS[layer]
  reference = None  # diffusers' float32 output, [B, T, C].
  for dtype_name in sorted(args.dtypes, key=lambda d: d != "float32"):
    dtype = DTYPES[dtype_name]
    abstract, hidden, context, cotangent = layer_inputs(layer, args.batch, dtype)
    params = random_like(abstract, seed=0, dtype=dtype)
    if reference is None:
      ref_inputs = layer_inputs(layer, args.batch, jnp.float32)
      _, ref_forward, _ = layer_programs(layer, "diffusers", jnp.float32)
      ref_params = random_like(abstract, seed=0, dtype=jnp.float32)
      reference = np.asarray(jax.jit(ref_forward)(ref_params, *ref_inputs[1:3]))
    for kind in args.attentions:
      _, forward, forward_backward = layer_programs(layer, kind, dtype)
      row = dict(
        base,
        layer=layer,
        tokens=tokens,
        channels=channels,
        heads=heads,
        context_tokens=context_tokens,
        batch=args.batch,
        dtype=dtype_name,
        attention=kind,
      )
      fwd_args, fb_args = (params, hidden, context), (params, hidden, context, cotangent)
      for name, fn, fn_args in (
        ("forward", forward, fwd_args),
        ("forward+backward", forward_backward, fb_args),
      ):
        result = measure(fn, fn_args, args.repeats, 1, args.max_temp_gib)
        extra = {}
        if name == "forward":  # After measure, which then times a fresh compile.
          out = np.asarray(jax.jit(forward)(*fwd_args), np.float32)
          extra["rel_err_vs_float32"] = round(rel_err(out, reference), 6)
        emit(dict(row, program=name, **extra, **result))


def bench_unet(args, base: dict) -> None:
  """The SD 2.1-base UNet's forward (predict_raw) per dtype and attention."""
  folder = sdm.config_dir("stable-diffusion-2-1-base")
  with open(os.path.join(folder, "unet", "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    abar = schedule.alphas_cumprod(json.load(f))
  rng = np.random.default_rng(2)
  x_t = jnp.asarray(rng.standard_normal((args.batch, 4, args.latent, args.latent), np.float32))
  t = jnp.asarray(rng.integers(20, 980, args.batch))
  emb = jnp.asarray(
    rng.standard_normal((args.batch, 77, config["cross_attention_dim"]), np.float32)
  )
  for dtype_name in args.dtypes:
    dtype = DTYPES[dtype_name]
    unet = sdm.unet_from_config(config, dtype)
    params = random_like(sdm.abstract_params(unet), seed=0, dtype=dtype)
    for kind in args.attentions:
      sd = sdm.StableDiffusion(
        modules=sdm.Modules(unet.clone(split_head_dim=kind == "diffusers-split"), None, None, None),
        unet_params={},
        vae_params={},
        text_params={},
        alphas_cumprod=jnp.asarray(abar, jnp.float32),
        prediction_type="epsilon",
        scaling_factor=0.18215,
        dtype=dtype,
        name="stable-diffusion-2-1-base",
        attention=_intercepted(kind),
      )
      forward = lambda params, x_t, t, emb, sd=sd: sdm.predict_raw(sd, params, x_t, t, emb)
      result = measure(forward, (params, x_t, t, emb), args.repeats, 1, args.max_temp_gib)
      row = dict(base, layer="unet", latent=args.latent, batch=args.batch, dtype=dtype_name)
      emit(dict(row, attention=kind, program="forward", **result))
    del params


def emit(row: dict) -> None:
  print(json.dumps(row), flush=True)


def main():
  args = parse_args()
  base = run_info(args.repeats)
  for layer in args.layers:
    bench_layer(args, layer, base)
  if args.unet:
    bench_unet(args, base)


if __name__ == "__main__":
  main()
