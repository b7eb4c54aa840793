"""Error of the bfloat16 Stable Diffusion prior against float32 (prior.dtype).

For each draw (a smooth random image at the prior's size, a timestep t, the
noise eps) both dtypes compute, in one jitted program each:

  x0       = encode_images(rgb)                   the VAE posterior mean [1, 4, h, w]
  eps_cond = eps_c                                the conditional eps, and
  eps_cfg  = eps_u + scale (eps_c - eps_u)        predict_eps_cfg's batch-2 UNet call on
                                                  x_t = a_t x0_f32 + s_t eps
  grad_sds = w(t) (eps_cfg - eps)                 SDS guidance gradient in latent space
  grad_vsd = w(t) (eps_cfg - eps_c)               VSD at eps_phi's init with eps_phi.base
                                                  = "prior" (LoRA B = 0, camera MLP 0), so
                                                  = w(t) (scale - 1) (eps_c - eps_u)
  rgb_grad_sds, rgb_grad_vsd = d surrogate / d rgb, the VAE encoder's VJP of each grad:
                                                  what reaches the render [1, H, W, 3]

Both dtypes see the same x_t (built from the float32 x0), so the eps error is the
UNet's alone; the rgb gradients combine the UNet's error (through grad) and the
VAE backward's. Each JSON line is one draw: per quantity the relative L2 error
|b - f| / |f| and the cosine similarity of bfloat16 (b) against float32 (f),
and delta_ratio = |eps_c - eps_u| / |eps_c| in float32 (grad_vsd's error grows
as it shrinks); a last line per model holds the worst draw of each.

  --model tiny: the tiny SD of tests/tiny_sd.py (built with torch into a
    temporary folder, loaded with load_stable_diffusion in each dtype; each
    dtype's own CLIP text encoder gives the prompt embeddings, as in training).
  --model sd21base: the SD 2.1-base architecture from the shipped configs with
    random weights (random_weights.py) drawn in float32 and rounded to
    bfloat16; random N(0, 1) text embeddings [77, 1024]. On a CPU one draw
    takes minutes per dtype (UNet at a 64x64 latent, batch 2; VAE encoder
    forward + backward at 512x512).

  python benchmarks/precision.py --model tiny --draws 16
  python benchmarks/precision.py --model sd21base --t 500          # CPU: minutes
  python benchmarks/precision.py --model sd21base --t 50,200,500,800,950   # GPU
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from random_weights import random_like
from vsdjax import prior as prior_lib
from vsdjax.guidance import distill
from vsdjax.prior import schedule, stable_diffusion as sdm
from xla_memory import run_info

QUANTITIES = ("x0", "eps_cond", "eps_cfg", "grad_sds", "grad_vsd", "rgb_grad_sds", "rgb_grad_vsd")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tiny", choices=("tiny", "sd21base"))
  p.add_argument("--draws", type=int, default=1, help="draws per timestep")
  p.add_argument("--t", default="50,200,500,800,950", help="comma-separated timesteps")
  p.add_argument("--scale", type=float, default=7.5, help="CFG scale")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  args.t = [int(t) for t in args.t.split(",")]
  if args.draws < 1 or not all(0 <= t < 1000 for t in args.t):
    p.error("--draws must be >= 1 and every --t in [0, 1000)")
  return args


def errors(reference: np.ndarray, approx: np.ndarray) -> dict:
  """Relative L2 error |approx - reference| / |reference| and cosine similarity."""
  f, b = np.ravel(reference).astype(np.float64), np.ravel(approx).astype(np.float64)
  norm_f, norm_b = np.linalg.norm(f), np.linalg.norm(b)
  return {
    "rel_l2": float(np.linalg.norm(b - f) / norm_f),
    "cos": float(f @ b / (norm_f * norm_b)),
  }


def quantities(sd, rgb, eps, t, emb, scale, x0_ref=None):
  """The compared quantities of one draw (see the module docstring).

  Args:
    sd: StableDiffusion (float32 or bfloat16; an argument, so no weight is a
      constant of the compiled program).
    rgb: [1, H, W, 3] in [0, 1] at the prior's image size.
    eps: [1, 4, h, w] noise; t: [1] integer timestep.
    emb: [2, L, D] unconditional and conditional text embeddings.
    scale: CFG scale.
    x0_ref: [1, 4, h, w] the latents x_t is built from; None: this model's own.

  Returns:
    {name: float32 array} of QUANTITIES.
  """
  x0, pullback = jax.vjp(lambda im: sdm.encode_images(sd, im), rgb)  # [1, 4, h, w]
  a_t, s_t = schedule.coefficients(sd.alphas_cumprod, t)
  x_t = schedule.add_noise(x0 if x0_ref is None else x0_ref, eps, a_t, s_t)
  eps_u, eps_c = jnp.split(
    sdm.predict_eps(sd, sd.unet_params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), emb),
    2,
  )  # [1, 4, h, w] each: predict_eps_cfg's one batch-2 call
  eps_cfg = schedule.cfg(eps_u, eps_c, scale)
  w_t = distill.weight(a_t**2)  # [1]
  grad_sds, _ = distill.guidance_grad(eps_cfg, eps, w_t)
  grad_vsd, _ = distill.guidance_grad(eps_cfg, eps_c, w_t)
  # d surrogate / d rgb = J_vae^T grad (surrogate_loss's gradient w.r.t. x0 is grad).
  (rgb_grads,) = jax.vmap(pullback)(jnp.stack([grad_sds, grad_vsd]))  # [2, 1, H, W, 3]
  return {
    "x0": x0,
    "eps_cond": eps_c,
    "eps_cfg": eps_cfg,
    "grad_sds": grad_sds,
    "grad_vsd": grad_vsd,
    "rgb_grad_sds": rgb_grads[0],
    "rgb_grad_vsd": rgb_grads[1],
  }


def smooth_image(key, size: int) -> jax.Array:
  """[1, size, size, 3] in [0, 1]: an 8x8 uniform image resized bilinearly (render-like)."""
  coarse = jax.random.uniform(key, (1, 8, 8, 3))
  return jax.image.resize(coarse, (1, size, size, 3), "bilinear")


def tiny_models(folder: str) -> tuple[dict, dict]:
  """{dtype name: () -> StableDiffusion} of the tiny SD and their [2, 77, 32] embeddings."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  import tiny_sd  # pylint: disable=g-import-not-at-top

  tiny_sd.build_tiny_sd(folder)
  models, embs = {}, {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    sd = prior_lib.load_stable_diffusion(folder, dtype)
    embs[name] = prior_lib.encode_prompts(sd, ["", "a red chair"])  # [2, 77, 32]
    models[name] = functools.partial(dataclasses.replace, sd, text_params={})
  return models, embs


def sd21base_models(seed: int) -> tuple[dict, dict]:
  """{dtype name: () -> StableDiffusion} of SD 2.1-base with random weights, and embeddings.

  Each call draws the weights again (same seed: the bfloat16 ones are the float32
  ones rounded), so only one dtype's weights are in memory at a time.
  """
  name = "stable-diffusion-2-1-base"

  def make(dtype):
    sd = sdm.abstract_model(name, dtype)
    return dataclasses.replace(
      sd,
      unet_params=random_like(sd.unet_params, seed, dtype),
      vae_params=random_like(sd.vae_params, seed + 1, dtype),
    )

  width = sdm.abstract_model(name).unet.cross_attention_dim
  emb = jax.random.normal(jax.random.PRNGKey(seed), (2, 77, width))
  models = {"float32": lambda: make(jnp.float32), "bfloat16": lambda: make(jnp.bfloat16)}
  return models, {"float32": emb, "bfloat16": emb}


def make_draws(sd, ts, n: int, seed: int) -> list:
  """[(t, i, rgb [1, H, W, 3], eps [1, 4, h, w], t [1])] for i < n per t, at sd's sizes."""
  size, latent = sdm.image_size(sd), sd.unet.sample_size
  draws = []
  for t in ts:
    for i in range(n):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), i)
      k_img, k_eps = jax.random.split(key)
      eps = jax.random.normal(k_eps, (1, 4, latent, latent))
      draws.append((t, i, smooth_image(k_img, size), eps, jnp.array([t], jnp.int32)))
  return draws


def main():
  args = parse_args()
  with tempfile.TemporaryDirectory() as folder:
    if args.model == "tiny":
      models, embs = tiny_models(folder)
    else:
      models, embs = sd21base_models(args.seed)
  base = dict(run_info(1), bench="precision", model=args.model, scale=args.scale)
  fn = jax.jit(quantities, static_argnums=5)
  results, seconds = {}, {}
  for name in ("float32", "bfloat16"):
    start = time.perf_counter()
    results[name], sd = [], models.pop(name)()
    draws = make_draws(sd, args.t, args.draws, args.seed)  # the same for both dtypes
    for j, (_, _, rgb, eps, t_arr) in enumerate(draws):
      x0_ref = None if name == "float32" else results["float32"][j]["x0"]
      out = fn(sd, rgb, eps, t_arr, embs[name], args.scale, x0_ref)
      results[name].append(jax.tree.map(np.asarray, out))
    del sd
    seconds[name] = round(time.perf_counter() - start, 1)
  rows = []
  for (t, i, *_), f, b in zip(draws, results["float32"], results["bfloat16"]):
    row = dict(base, image=f["rgb_grad_sds"].shape[1], t=t, draw=i)
    row.update({q: errors(f[q], b[q]) for q in QUANTITIES})
    # |eps_c - eps_u| / |eps_c| in float32 (eps_cfg - eps_c = (scale - 1) (eps_c - eps_u)):
    # how small the difference grad_vsd is proportional to is against the eps it comes from.
    delta = np.linalg.norm(f["eps_cfg"] - f["eps_cond"]) / (args.scale - 1)
    row["delta_ratio"] = float(delta / np.linalg.norm(f["eps_cond"]))
    if args.model == "tiny":
      row["emb"] = errors(embs["float32"], embs["bfloat16"])
    rows.append(row)
    print(json.dumps(row), flush=True)
  worst = {
    q: {
      "rel_l2": max(r[q]["rel_l2"] for r in rows),
      "cos": min(r[q]["cos"] for r in rows),
    }
    for q in QUANTITIES
  }
  print(json.dumps(dict(base, t=args.t, draws=len(rows), worst=worst, seconds=seconds)), flush=True)


if __name__ == "__main__":
  main()
