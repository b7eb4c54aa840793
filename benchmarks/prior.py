"""Speed, FLOPs and memory of the Stable Diffusion prior, random weights.

Builds the real SD 2.1-base architecture from the shipped configs (no weights
needed) with random params drawn on the abstract shapes, and prints one JSON
object per line:

  UNet (default), latent --latent x --latent (64: 512 px renders), per dtype
  and batch: the eps forward (`predict_eps`) and the forward + backward of
  mean(eps^2) w.r.t. rank-4 LoRA factors on every attention projection (what
  the VSD eps_phi update differentiates), per --lora way of applying them
  ("intercept": added beside the frozen kernels, as eps_phi runs; "merge":
  W + A B merged into the kernels, as it ran before); per program the compile time, the
  median run time over --repeats, XLA's cost-analysis FLOPs and its compiled
  memory estimate; and the same forward of diffusers' PyTorch UNet on the
  same inputs, timed in the same run (torch_forward_s, jax/torch ratio).

  --vae: the VAE encoder (`encode_images`) forward and forward + backward
  w.r.t. the rgb input at --image x --image (512), the gradient path of every
  distillation step, with the PyTorch encoder forward for comparison.

  python benchmarks/prior.py                                   # GPU: batch 1,2,3,4
  python benchmarks/prior.py --batch 1 --dtypes float32 --repeats 1  # CPU check
  python benchmarks/prior.py --vae --batch 1
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from random_weights import random_like
from vsdjax.guidance import lora
from vsdjax.prior import schedule, stable_diffusion as sdm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--config",
    default="stable-diffusion-2-1-base",
    choices=sdm.BUILTIN_CONFIGS,
    help="shipped config set",
  )
  p.add_argument(
    "--batch",
    default="1,2,3,4",
    help="comma-separated batch sizes (3: the prior's CFG pair and eps_phi's target in one call)",
  )
  p.add_argument(
    "--dtypes", default="float32,bfloat16", help="comma-separated, of " + ", ".join(DTYPES)
  )
  p.add_argument("--repeats", type=int, default=5, help="timed runs per program")
  p.add_argument("--latent", type=int, default=64, help="UNet latent size")
  p.add_argument("--lora-rank", type=int, default=4)
  p.add_argument(
    "--lora", default="intercept", help="comma-separated, of intercept (eps_phi's way), merge"
  )
  p.add_argument("--vae", action="store_true", help="benchmark the VAE encoder instead of the UNet")
  p.add_argument("--image", type=int, default=512, help="VAE image size")
  p.add_argument(
    "--torch",
    default="auto",
    choices=("auto", "on", "off"),
    help="time diffusers' PyTorch model too (auto: on the GPU if "
    "torch sees one, on the CPU if JAX runs there)",
  )
  args = p.parse_args()
  args.batch = [int(b) for b in args.batch.split(",")]
  args.dtypes = args.dtypes.split(",")
  args.lora = args.lora.split(",")
  unknown = [d for d in args.dtypes if d not in DTYPES] + [
    w for w in args.lora if w not in ("intercept", "merge")
  ]
  if unknown or min(args.batch) < 1 or args.repeats < 1:
    p.error(f"bad --dtypes / --lora {unknown} / --batch / --repeats")
  return args


def measure(fn, args, repeats: int) -> dict:
  """Compile time, median run time, FLOPs and memory estimate of jit(fn)(*args).

  FLOPs are the cost analysis of the lowered program, before any backend
  pass: the same count on every backend. The compiled program's analysis is
  not used: on GPUs it leaves out most of what runs in cuBLAS / cuDNN calls
  (0.03 against 0.79 TFLOP for the float32 SD UNet forward on an H200).
  """
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  cost = lowered.cost_analysis()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  gib = 2.0**30
  return {
    "compile_s": round(compile_s, 2),
    "run_s": round(statistics.median(times), 4),
    "tflop": round(cost.get("flops", float("nan")) / 1e12, 4),
    "tflop_per_s": round(cost.get("flops", float("nan")) / 1e12 / statistics.median(times), 2),
    "memory_gib": {
      "arguments": round(memory.argument_size_in_bytes / gib, 3),
      "outputs": round(memory.output_size_in_bytes / gib, 3),
      "temp": round(memory.temp_size_in_bytes / gib, 3),
    },
  }


def torch_device(mode: str):
  """The torch device to compare on, or None (with --torch auto, torch runs on
  the GPU when it sees one and on the CPU only when JAX runs there too)."""
  if mode == "off":
    return None
  import torch  # pylint: disable=g-import-not-at-top

  if torch.cuda.is_available():
    # XLA's default float32 precision on GPUs computes dots and convolutions
    # in TF32; let PyTorch do the same, so the ratio compares like with like.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuda"
  return "cpu" if mode == "on" or jax.default_backend() == "cpu" else None


def torch_time(module_call, inputs, device, repeats: int) -> float:
  """Median seconds of module_call(*inputs) under torch.no_grad()."""
  import torch  # pylint: disable=g-import-not-at-top

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.no_grad():
    module_call(*inputs)
    sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      module_call(*inputs)
      sync()
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def read_config(name: str, component: str) -> dict:
  with open(os.path.join(sdm.config_dir(name), component, "config.json")) as f:
    return json.load(f)


def bench_unet(args, dtype_name: str, device, base: dict) -> None:
  dtype = DTYPES[dtype_name]
  config = read_config(args.config, "unet")
  unet = sdm.unet_from_config(config, dtype)
  key = jax.random.PRNGKey(0)
  params = random_like(sdm.abstract_params(unet), 0, dtype)
  with open(os.path.join(sdm.config_dir(args.config), "scheduler", "scheduler_config.json")) as f:
    scheduler_config = json.load(f)
  sd = sdm.StableDiffusion(
    modules=sdm.Modules(unet, None, None, None),
    unet_params=None,
    vae_params=None,
    text_params=None,
    alphas_cumprod=jnp.asarray(schedule.alphas_cumprod(scheduler_config)),
    prediction_type=scheduler_config["prediction_type"],
    scaling_factor=0.18215,
    dtype=dtype,
    name=args.config,
  )
  adapters = lora.init(key, params, args.lora_rank)
  torch_unet = None
  if device is not None:
    from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    torch_dtype = getattr(torch, dtype_name)
    with torch.device(device):  # Initialised on the device it runs on.
      torch_unet = UNet2DConditionModel.from_config(config).to(dtype=torch_dtype).eval()

  # sd (a pytree) travels as an argument, so no weight becomes a constant of
  # the compiled program; the UNet params are passed on their own.
  def forward(sd, params, x_t, t, emb):
    return sdm.predict_eps(sd, params, x_t, t, emb)

  def lora_grad(way, sd, adapters, params, x_t, t, emb):
    def loss(adapters):
      if way == "merge":
        eps = sdm.predict_eps(sd, lora.merge(params, adapters, 1.0), x_t, t, emb)
      else:
        with lora.intercept(adapters, 1.0):
          eps = sdm.predict_eps(sd, params, x_t, t, emb)
      return jnp.mean(jnp.square(eps))

    return jax.grad(loss)(adapters)

  for batch in args.batch:
    keys = jax.random.split(jax.random.fold_in(key, batch), 3)
    x_t = jax.random.normal(keys[0], (batch, 4, args.latent, args.latent))
    t = jax.random.randint(keys[1], (batch,), 20, 980)
    emb = jax.random.normal(keys[2], (batch, 77, config["cross_attention_dim"]))
    row = dict(
      base,
      model="unet",
      dtype=dtype_name,
      batch=batch,
      latent=args.latent,
      lora_rank=args.lora_rank,
      lora_params=lora.count(adapters),
    )
    row["forward"] = measure(forward, (sd, params, x_t, t, emb), args.repeats)
    for way in args.lora:
      row["forward_backward_lora" + ("_merged" if way == "merge" else "")] = measure(
        functools.partial(lora_grad, way), (sd, adapters, params, x_t, t, emb), args.repeats
      )
    if torch_unet is not None:
      inputs = [torch.from_numpy(np.array(a)).to(device) for a in (x_t, t, emb)]
      inputs = [inputs[0].to(torch_dtype), inputs[1], inputs[2].to(torch_dtype)]
      seconds = torch_time(lambda x, t, e: torch_unet(x, t, e).sample, inputs, device, args.repeats)
      row["torch_device"], row["torch_forward_s"] = device, round(seconds, 4)
      row["jax_over_torch_forward"] = round(row["forward"]["run_s"] / seconds, 3)
    print(json.dumps(row), flush=True)


def bench_vae(args, dtype_name: str, device, base: dict) -> None:
  dtype = DTYPES[dtype_name]
  config = read_config(args.config, "vae")
  vae = sdm.vae_from_config(config, dtype)
  params = random_like(sdm.abstract_params(vae), 0, dtype)
  sd = sdm.StableDiffusion(
    modules=sdm.Modules(None, vae, None, None),
    unet_params=None,
    vae_params=params,
    text_params=None,
    alphas_cumprod=None,
    prediction_type="epsilon",
    scaling_factor=float(config.get("scaling_factor", 0.18215)),
    dtype=dtype,
    name=args.config,
  )
  torch_vae = None
  if device is not None:
    from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top

    torch_dtype = getattr(torch, dtype_name)
    with torch.device(device):
      torch_vae = AutoencoderKL.from_config(config).to(dtype=torch_dtype).eval()

  def forward(sd, rgb):
    return sdm.encode_images(sd, rgb)

  def input_grad(sd, rgb):
    return jax.grad(lambda x: jnp.mean(jnp.square(sdm.encode_images(sd, x))))(rgb)

  for batch in args.batch:
    rgb = jax.random.uniform(jax.random.PRNGKey(batch), (batch, args.image, args.image, 3))
    row = dict(base, model="vae_encoder", dtype=dtype_name, batch=batch, image=args.image)
    row["forward"] = measure(forward, (sd, rgb), args.repeats)
    row["forward_backward_input"] = measure(input_grad, (sd, rgb), args.repeats)
    if torch_vae is not None:
      x = torch.from_numpy(np.array(rgb)).permute(0, 3, 1, 2)
      x = (2 * x - 1).to(device, torch_dtype)
      seconds = torch_time(
        lambda x: torch_vae.encode(x).latent_dist.mean, [x], device, args.repeats
      )
      row["torch_device"], row["torch_forward_s"] = device, round(seconds, 4)
      row["jax_over_torch_forward"] = round(row["forward"]["run_s"] / seconds, 3)
    print(json.dumps(row), flush=True)


def main():
  args = parse_args()
  device = torch_device(args.torch)
  base = {
    "config": args.config,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "host": platform.node(),
    "repeats": args.repeats,
  }
  for dtype_name in args.dtypes:
    if args.vae:
      bench_vae(args, dtype_name, device, base)
    else:
      bench_unet(args, dtype_name, device, base)


if __name__ == "__main__":
  main()
