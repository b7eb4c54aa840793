"""The paper's claims on the analytic prior's ground truth: CFG, diversity, mode coverage.

Short training runs on the analytic prior, driven in-process (models.build,
init_state, make_train_step and the preview renderer of vsdjax.training; no
work directory), from experiments/toy2d.py (2D: particles are images) and
experiments/toy.py (3D: NeRFs), with the overrides each part names:

  cfg       Prompt "a red sphere" among a red and a blue sphere (the prompt ""
            is the unconditional branch), so classifier-free guidance acts.
            SDS at CFG 100 (DreamFusion), VSD at 7.5 (ProlificDreamer) and SDS
            at 7.5, in 2D (sigma_ref 0.1: the references have texture) and 3D
            (point masses; and SDS at 100 without toy.py's switch to t_max
            0.5). Per run: PSNR to the red sphere (3D: held-out cameras); the
            object's mean colour and its HSV saturation (and the mean per-pixel
            saturation, which counts texture as colour); "detail": the std of
            the residual to the red sphere after its mean over the object (x0
            units; a sample of the 2D prior has sigma_ref).
  spread    2D VSD, one reference, n = 8: the particles' per-pixel std against
            sigma_ref in 0.02-0.3, with eps_phi's lr 1e-3 (toy2d) and 1e-4; at
            the end of each run, how much eps_phi memorises its particles (see
            `memorisation`). Beside it the numpy model of spread_model.py with
            an exact eps_phi of four kinds (`spread_model.spread`).
  variants  the spread at sigma_ref 0.05 and 0.2 with 16 particles, 4 t per
            particle and step, a lower particle lr, and eps_phi at lr 1e-4 for
            2000 steps (SPREAD_VARIANTS).
  combined  all of these at once, at sigma_ref 0.02 and 0.3 (COMBINED).
  coverage  3D, two references, n particles, VSD (and SDS): every
            `probe_every` steps, each particle's nearest reference on held-out
            cameras, over pairs x seeds x starts (grey, or albedo_init_std 1);
            the share per reference over steps, the switches between
            references, and the coverage rate (runs whose particles cover both).
  more_particles  the same with eight particles (VSD, random colours).
  slow_phi  the same with eps_phi at lr 1e-4 (VSD, random colours, four particles).

Writes OUT/claims.jsonl (a line per run), OUT/claims.md (the tables README.md
shows) and OUT/{cfg_2d,cfg_3d,spread,coverage}.png.

  python benchmarks/claims.py --out benchmarks/claims              # README's figures
  python benchmarks/claims.py --quick --out /tmp/claims            # a few minutes
  python benchmarks/claims.py --parts spread --out /tmp/claims
  python benchmarks/claims.py --parts "" --out benchmarks/claims     # tables and plots only
"""

import argparse
import importlib.util
import json
import os
import time

import imageio.v3 as iio
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
import spread_model

from vsdjax import cameras, checks, grid
from vsdjax.prior import schedule
from vsdjax.prior.analytic import evaluate, shapes
from vsdjax.representations import image
from vsdjax.training import models as models_lib, previews, train_step

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
RED_BLUE = "sphere:#d04040,sphere:#3060c0"  # reference 0 is the prompt's
# (mode, CFG scale, t_max switch): 3D runs switch t_max 0.98 -> 0.5 at 3/4 of the steps as
# toy.py does; the last run keeps t_max 0.98 (DreamFusion's t range), in 3D only.
CFG_RUNS = (("sds", 100.0, True), ("vsd", 7.5, True), ("sds", 7.5, True), ("sds", 100.0, False))
PAIRS = ("sphere,cube", "torus,cone", "cylinder,cube")  # default colours (shapes.DEFAULT_COLORS)
PROBE_VIEWS = 4  # held-out cameras of the 3D probes
MEMORISATION_T = (20, 50, 100, 200)  # timesteps where eps_phi's memorisation is measured

# (full, quick) settings.
SETTINGS = {
  "cfg_2d_steps": (500, 100),
  "cfg_3d_steps": (400, 60),
  "spread_sigmas": ((0.02, 0.05, 0.1, 0.2, 0.3), (0.05, 0.2)),
  "spread_phi_lrs": ((1e-3, 1e-4), (1e-3,)),
  "spread_steps": (800, 100),
  "model_steps": (2000, 300),
  "variant_sigmas": ((0.05, 0.2), (0.2,)),
  "coverage_pairs": (PAIRS, PAIRS[:1]),
  "coverage_seeds": ((0, 1, 2), (0,)),
  "coverage_steps": (200, 40),
  "probe_every": (25, 20),
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="folder for claims.jsonl, claims.md and the PNGs")
  p.add_argument(
    "--parts",
    default="cfg,spread,variants,combined,coverage,more_particles,slow_phi",
    help="comma-separated parts",
  )
  p.add_argument("--quick", action="store_true", help="small settings: a few minutes")
  return p.parse_args()


def experiment(name: str, overrides: dict):
  """experiments/<name>.py's config with dotted-key overrides."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  config.preview_every = 0
  return config


def train(config, probe, probe_every: int) -> tuple:
  """Runs config.steps steps as train_and_evaluate does (same seed, same keys).

  Returns:
    (models, frozen, state, trace, seconds): trace is [(step, probe(state))]
    at step 0, every probe_every steps and at the end.
  """
  checks.validate_config(config)
  k_models, k_init, k_steps = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  models, frozen = models_lib.build(config, k_models)
  state = jax.jit(lambda f: train_step.init_state(config, models, f, k_init))(frozen)
  step_fn = train_step.make_train_step(config, models, frozen, config.render.resolution)
  look = probe(models, frozen)
  trace = [(0, look(state))]
  t0 = time.time()
  for step in range(1, config.steps + 1):
    state, metrics = step_fn(state, k_steps)
    if step % probe_every == 0 or step == config.steps:
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {step}")
      trace.append((step, look(state)))
  return models, frozen, state, trace, time.time() - t0


def render_probe(refs, cams, size: int):
  """probe(models, frozen) -> look(state) -> rgb renders [n, V, size, size, 3] (numpy, clipped)."""

  def probe(models, frozen):
    render = previews.make_render(models.representation, size, cams=cams)

    def look(state):
      data = dict(frozen["representation"], aux=state.get("aux", {}))
      return np.clip(np.asarray(render(state["particles"], data)["rgb"], np.float64), 0.0, 1.0)

    return look

  ref = np.asarray(shapes.render_views(refs, cams.c2w, cams.fovy, size, size)["rgb"], np.float64)
  return probe, ref  # ref [V, K, size, size, 3]


def saturation(rgb: np.ndarray) -> np.ndarray:
  """HSV saturation (max - min) / max of rgb [..., 3] -> [...]."""
  hi, lo = rgb.max(-1), rgb.min(-1)
  return (hi - lo) / np.maximum(hi, 1e-6)


def image_metrics(rgb: np.ndarray, ref: np.ndarray, target: int) -> dict:
  """Renders rgb [n, V, H, W, 3] against references ref [V, K, H, W, 3] (both in [0, 1]).

  Returns per-particle lists: psnr_to [n][K] (dB), nearest [n], and, over the
  pixels of the target reference's object (not its white background),
  saturation [n], colour [n][3] (mean rgb), detail [n] (x0 units); and the
  target reference's saturation and colour.
  """
  mse = np.mean(np.square(rgb[:, :, None] - ref[None]), axis=(1, 3, 4, 5))  # [n, K]
  mask = np.any(ref[:, target] < 0.98, axis=-1)  # [V, H, W]
  obj = rgb[:, mask]  # [n, P, 3]
  resid = obj - ref[:, target][mask][None]  # [n, P, 3]
  detail = 2.0 * np.std(resid - resid.mean(axis=1, keepdims=True), axis=1).mean(-1)  # [n]
  return {
    "psnr_to": np.round(evaluate.psnr(mse), 2).tolist(),
    "nearest": np.argmin(mse, axis=1).tolist(),
    "saturation": np.round(saturation(obj).mean(-1), 3).tolist(),
    "colour": np.round(obj.mean(1), 3).tolist(),
    "detail": np.round(detail, 4).tolist(),
    "saturation_ref": round(float(saturation(ref[:, target][mask]).mean()), 3),
    "colour_ref": np.round(ref[:, target][mask].mean(0), 3).tolist(),
  }


def memorisation(models, frozen, state, key) -> dict:
  """How much eps_phi predicts its particles' own noise (2D runs).

  At small t, a network that has memorised its n training images answers
  x_t = a_t x_i + s_t eps with eps itself (the exact denoiser of n point
  masses), which turns the VSD update into SDS's. A network that generalises
  answers like the Gaussian fitted to the particles, g(x_t) = s_t (x_t - a_t
  mu) / (a_t^2 v + s_t^2) (mu, v: their mean and mean per-pixel variance).
  lambda = <eps_phi - g, eps - g> / |eps - g|^2 is 1 for the first and 0 for
  the second; it is measured on the particles and, as a control, on fresh
  samples of the fitted Gaussian (which eps_phi has not seen).

  Returns:
    {"t": [...], "particles": [lambda per t], "fresh": [lambda per t]}.
  """
  images = state["particles"]["image"]  # [n, 3, h, w]
  n = images.shape[0]
  mu, var = jnp.mean(images, axis=0), jnp.mean(jnp.var(images, axis=0))
  cam = models.representation.sample_camera(None)
  emb = jnp.repeat(frozen["phi_emb"][None], n, axis=0)
  camera = jnp.tile(cam.c2w.reshape(1, 16), (n, 1))
  abar = jnp.asarray(models.prior.alphas_cumprod)
  out = {"t": list(MEMORISATION_T), "particles": [], "fresh": []}
  for t_value in MEMORISATION_T:
    t = jnp.full((n,), t_value)
    a_t, s_t = schedule.coefficients(abar, t)
    k_fresh, k_eps, key = jax.random.split(key, 3)
    fresh = mu + jnp.sqrt(var) * jax.random.normal(k_fresh, images.shape)
    for name, x0 in (("particles", images), ("fresh", fresh)):
      eps = jax.random.normal(k_eps, x0.shape)
      x_t = schedule.add_noise(x0, eps, a_t, s_t)
      pred = models.eps_phi.predict_eps(frozen["phi_base"], state["phi"], x_t, t, emb, camera)
      s, a = s_t[0], a_t[0]
      g = s * (x_t - a * mu) / (a**2 * var + s**2)
      lam = jnp.sum((pred - g) * (eps - g)) / jnp.sum(jnp.square(eps - g))
      out[name].append(round(float(lam), 3))
  return out


def write_line(out_dir: str, record: dict) -> None:
  with open(os.path.join(out_dir, "claims.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
  print(json.dumps(record), flush=True)


def save_png(path: str, image: np.ndarray, zoom: int = 1) -> None:
  """Writes an image [H, W, 3] in [0, 1], each pixel as zoom x zoom pixels."""
  image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
  iio.imwrite(path, (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


def run_cfg(out_dir: str, setting) -> list:
  """SDS at CFG 100, VSD at 7.5, SDS at 7.5 in 2D and 3D; one record per run; the PNGs.

  The pictures' rows: the red sphere (2D: exact samples of the prompt's component, the
  ground truth), then the runs of CFG_RUNS; columns: particles (2D) or held-out views (3D).
  """
  records = []
  fixed_camera = jax.tree.map(
    lambda v: jnp.asarray(v)[None], cameras.from_spherical(**image.CAMERA)
  )
  for dim in ("2d", "3d"):
    if dim == "2d":
      name, size, cams, sigma = "toy2d", 16, fixed_camera, 0.1
      overrides = {"n_particles": 4, "prior.sigma_ref": sigma, "steps": setting("cfg_2d_steps")}
    else:
      name, size, cams, sigma = "toy", 32, evaluate.heldout_cameras(PROBE_VIEWS), 0.0
      overrides = {"n_particles": 1, "steps": setting("cfg_3d_steps")}
      overrides["guidance.t_switch_step"] = overrides["steps"] * 3 // 4
    overrides.update({"prior.references": RED_BLUE, "prompt": "a red sphere"})
    probe, ref = render_probe(shapes.parse_references(RED_BLUE), cams, size)
    # Exact samples of the prompt's component (rgb std sigma_ref / 2): what the runs should be.
    z = np.random.default_rng(0).standard_normal((overrides["n_particles"], *ref[:, 0].shape))
    truth = np.clip(ref[None, :, 0] + 0.5 * sigma * z, 0.0, 1.0)  # [n, V, H, W, 3]
    record = {"part": "cfg", "dim": dim, "mode": "prior", "scale": 0.0, "steps": 0}
    record.update(image_metrics(truth, ref, 0), seconds=0.0)
    write_line(out_dir, record)
    records.append(record)
    rows = [truth[:, 0] if dim == "2d" else truth[0]]  # 2D: particles; 3D: views
    for mode, scale, switch in CFG_RUNS:
      if dim == "2d" and not switch:
        continue  # toy2d keeps t_max 0.98 throughout
      run = {**overrides, "guidance.mode": mode, "guidance.scale": scale}
      if not switch:
        run["guidance.t_switch_step"] = 10**9
      config = experiment(name, run)
      *_, trace, seconds = train(config, probe, config.steps)
      rgb = trace[-1][1]  # [n, V, H, W, 3]
      record = {"part": "cfg", "dim": dim, "mode": mode, "scale": scale, "steps": config.steps}
      record["t_switch_step"] = config.guidance.t_switch_step if switch else None
      record.update(image_metrics(rgb, ref, 0), seconds=round(seconds, 1))
      write_line(out_dir, record)
      records.append(record)
      rows.append(rgb[:, 0] if dim == "2d" else rgb[0])
    picture = grid.tile(np.stack(rows))
    save_png(os.path.join(out_dir, f"cfg_{dim}.png"), picture, zoom=64 // size)
  return records


def spread_run(overrides: dict) -> dict:
  """One 2D VSD run (toy2d.py with overrides): its spread (mean over the second half of the
  steps), eps_phi's memorisation at the end, the spread every 25 steps."""
  config = experiment("toy2d", overrides)
  spreads = lambda models, frozen: lambda s: float(jnp.mean(jnp.std(s["particles"]["image"], 0)))
  models, frozen, state, trace, seconds = train(config, spreads, 25)
  tail = [v for step, v in trace if step > config.steps // 2]
  return {
    "steps": config.steps, "spread": round(float(np.mean(tail)), 4),
    "memorisation": memorisation(models, frozen, state, jax.random.PRNGKey(1)),
    "trace": [(step, round(v, 4)) for step, v in trace], "seconds": round(seconds, 1),
  }  # fmt: skip


def run_spread(out_dir: str, setting) -> list:
  """2D VSD spread against sigma_ref (learned eps_phi), and the numpy model's controls."""
  records = []
  for sigma in setting("spread_sigmas"):
    for lr in setting("spread_phi_lrs"):
      overrides = {"prior.sigma_ref": sigma, "eps_phi.lr": lr, "steps": setting("spread_steps")}
      record = {"part": "spread", "kind": "learned", "sigma_ref": sigma, "phi_lr": lr}
      record.update(spread_run(overrides))
      write_line(out_dir, record)
      records.append(record)
  controls = {"gaussian": (0.0, 0.0), "noisy 0.02": (0.02, 0.0), "memorise 0.5": (0.0, 0.5)}
  for sigma in setting("spread_sigmas"):
    for kind, (error, memorise) in controls.items():
      value = spread_model.spread(
        sigma, error, "adam", 1e-2, setting("model_steps"), 8, 16 * 16 * 3, (0.02, 0.98), 0,
        memorise=memorise,
      )  # fmt: skip
      record = {"part": "spread", "kind": f"model, {kind}", "sigma_ref": sigma,
                "steps": setting("model_steps"), "spread": round(value, 4)}  # fmt: skip
      write_line(out_dir, record)
      records.append(record)
  return records


# What else might make the 2D spread follow sigma_ref: (label, toy2d overrides).
SPREAD_VARIANTS = (
  ("16 particles", {"n_particles": 16}),
  ("4 t per particle and step (views_per_step 4)", {"views_per_step": 4}),
  ("particle lr 3e-3 (toy2d: 1e-2)", {"optim.lr": 3e-3}),
  ("eps_phi lr 1e-4, 2000 steps", {"eps_phi.lr": 1e-4, "steps": 2000}),
)


# Every remedy above at once, at the ends of the sigma_ref range.
COMBINED = (
  (
    "16 particles, particle lr 3e-3, eps_phi lr 1e-4, 2000 steps",
    {"n_particles": 16, "optim.lr": 3e-3, "eps_phi.lr": 1e-4, "steps": 2000},
  ),
)


def run_variants(out_dir: str, setting, variants=SPREAD_VARIANTS, sigmas=None) -> list:
  """The 2D spread at the ends of the sigma_ref range under `variants` (label, overrides)."""
  records = []
  for label, overrides in variants:
    for sigma in sigmas or setting("variant_sigmas"):
      record = {"part": "variants", "variant": label, "sigma_ref": sigma}
      # A variant's own steps are for the full setting: scaled like spread_steps.
      steps = overrides.get("steps", SETTINGS["spread_steps"][0])
      steps = steps * setting("spread_steps") // SETTINGS["spread_steps"][0]
      record.update(spread_run({**overrides, "prior.sigma_ref": sigma, "steps": steps}))
      write_line(out_dir, record)
      records.append(record)
  return records


def run_combined(out_dir: str, setting) -> list:
  """COMBINED at the ends of spread_sigmas (0.02 and 0.3)."""
  sigmas = setting("spread_sigmas")
  return run_variants(out_dir, setting, COMBINED, (sigmas[0], sigmas[-1]))


def plot_spread(records: list, path: str) -> None:
  fig = Figure(figsize=(5.5, 4), dpi=100)
  ax = fig.add_subplot()
  sigmas = sorted({r["sigma_ref"] for r in records})
  ax.plot(sigmas, sigmas, "k:", label="sigma_ref (target)")
  series = {}
  for r in records:
    label = f"VSD, eps_phi lr {r['phi_lr']:g}" if r["kind"] == "learned" else r["kind"]
    series.setdefault(label, []).append((r["sigma_ref"], r["spread"]))
  for label, points in series.items():
    x, y = zip(*sorted(points))
    ax.plot(x, y, "o-" if label.startswith("VSD") else "s--", label=label, markersize=4)
  ax.set_xlabel("sigma_ref")
  ax.set_ylabel("spread (per-pixel std across particles)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)


def coverage_overrides(pair, seed, mode, start, n, phi_lr, steps) -> dict:
  """toy.py's overrides of a coverage run."""
  return {
    "prior.references": pair, "n_particles": n, "seed": seed, "steps": steps,
    "guidance.t_switch_step": steps * 3 // 4, "guidance.mode": mode,
    "scene.albedo_init_std": start, "eps_phi.lr": phi_lr,
  }  # fmt: skip


def run_coverage(out_dir: str, setting, variants=None) -> list:
  """3D mode coverage over pairs x seeds x variants; the nearest reference over steps.

  variants: (mode, albedo_init_std, seeds, n_particles, eps_phi lr) tuples; by default
  VSD and SDS from random colours and VSD from the grey start (once per pair: identical
  starts fall alike), four particles each, eps_phi's lr toy.py's 1e-3.
  """
  records = []
  cams = evaluate.heldout_cameras(PROBE_VIEWS)
  steps = setting("coverage_steps")
  seeds = setting("coverage_seeds")
  if variants is None:
    variants = [
      ("vsd", 1.0, seeds, 4, 1e-3),
      ("sds", 1.0, seeds, 4, 1e-3),
      ("vsd", 0.0, seeds[:1], 4, 1e-3),
    ]
  for pair in setting("coverage_pairs"):
    refs = shapes.parse_references(pair)
    probe, ref = render_probe(refs, cams, 32)
    for mode, start, variant_seeds, n, phi_lr in variants:
      for seed in variant_seeds:
        overrides = coverage_overrides(pair, seed, mode, start, n, phi_lr, steps)
        config = experiment("toy", overrides)
        *_, trace, seconds = train(config, probe, setting("probe_every"))
        nearest = [image_metrics(rgb, ref, 0)["nearest"] for _, rgb in trace]  # [probes][n]
        last = image_metrics(trace[-1][1], ref, 0)
        record = {
          "part": "coverage", "pair": pair, "seed": seed, "mode": mode, "albedo_init_std": start,
          "n_particles": n, "phi_lr": phi_lr,
          "steps": steps, "probe_steps": [s for s, _ in trace], "nearest": nearest,
          "switches": int(sum(np.sum(np.diff(np.asarray(nearest), axis=0) != 0, axis=0))),
          "covered": sorted(set(nearest[-1])), "psnr_to": last["psnr_to"],
          "seconds": round(seconds, 1),
        }  # fmt: skip
        write_line(out_dir, record)
        records.append(record)
  return records


def run_more_particles(out_dir: str, setting) -> list:
  """Coverage with eight particles (VSD, random colours, the first two seeds)."""
  return run_coverage(out_dir, setting, [("vsd", 1.0, setting("coverage_seeds")[:2], 8, 1e-3)])


def run_slow_phi(out_dir: str, setting) -> list:
  """Coverage with eps_phi at lr 1e-4 (VSD, random colours, four particles, two seeds)."""
  return run_coverage(out_dir, setting, [("vsd", 1.0, setting("coverage_seeds")[:2], 4, 1e-4)])


def _variant(r) -> tuple:
  """A coverage record's (mode, albedo_init_std, n_particles, eps_phi lr)."""
  return r["mode"], r["albedo_init_std"], r.get("n_particles", 4), r.get("phi_lr", 1e-3)


def _variant_label(mode, start, n, phi_lr) -> str:
  lr = f", eps_phi lr {phi_lr:g}" if mode == "vsd" and phi_lr != 1e-3 else ""
  return f"{mode.upper()}, n = {n}, albedo_init_std {start:g}{lr}"


def plot_coverage(records: list, path: str) -> None:
  """Share of particles nearest to the pair's first reference over steps, a panel per variant."""
  variants = list(dict.fromkeys(_variant(r) for r in records))
  fig = Figure(figsize=(3.6 * len(variants), 3.2), dpi=100)
  for i, variant in enumerate(variants):
    ax = fig.add_subplot(1, len(variants), i + 1)
    for r in records:
      if _variant(r) != variant:
        continue
      share = [1.0 - np.mean(nearest) for nearest in r["nearest"]]
      ax.plot(r["probe_steps"], share, alpha=0.7, label=f"{r['pair']} s{r['seed']}")
    ax.set_title(_variant_label(*variant), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    if i == 0:
      ax.set_ylabel("share nearest to the first reference")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)


def coverage_records(records: list) -> list:
  """The latest coverage record of each (pair, seed, variant)."""
  coverage = [r for r in records if r["part"] == "coverage"]
  return _latest(coverage, lambda r: (r["pair"], r["seed"], *_variant(r)))


def _latest(records: list, key) -> list:
  """The last record of each key(record), in first-seen order (reruns append to claims.jsonl)."""
  out = {}
  for r in records:
    out[key(r)] = r
  return list(out.values())


def tables(records: list) -> str:
  """claims.md: the three tables of README.md from claims.jsonl's records."""
  lines = []
  order = [("prior", 0.0, True), *CFG_RUNS]
  switched = lambda r: r["dim"] == "2d" or r["mode"] == "prior" or bool(r.get("t_switch_step", 1))
  key = lambda r: (r["dim"], r["mode"], r["scale"], switched(r))
  cfg = _latest([r for r in records if r["part"] == "cfg"], key)
  cfg.sort(key=lambda r: (r["dim"], order.index(key(r)[1:])))
  if cfg:
    lines += [
      "| | run | PSNR to the red sphere (dB) | mean colour (the red sphere's) | its saturation "
      "| per-pixel saturation | detail, x0 units | steps, s |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in cfg:
      psnr = [p[0] for p in r["psnr_to"]]
      colour = np.mean(r["colour"], axis=0)
      run = f"{r['mode'].upper()}, CFG {r['scale']:g}"
      if r["mode"] == "prior":
        run = "exact samples of the prompt" if r["dim"] == "2d" else "the reference itself"
      elif not switched(r):
        run += ", t_max 0.98 throughout"
      lines.append(
        f"| {r['dim'].upper()} | {run} | {np.mean(psnr):.2f} "
        f"({min(psnr):.2f}-{max(psnr):.2f}) | {_rgb(colour)} ({_rgb(r['colour_ref'])}) "
        f"| {saturation(colour):.3f} ({saturation(np.asarray(r['colour_ref'])):.3f}) "
        f"| {np.mean(r['saturation']):.3f} ({r['saturation_ref']:.3f}) "
        f"| {np.mean(r['detail']):.3f} | {r['steps']}, {r['seconds']:.0f} |"
      )
    lines.append("")
  learned = _latest(
    [r for r in records if r["part"] == "spread" and r["kind"] == "learned"],
    lambda r: (r["sigma_ref"], r["phi_lr"]),
  )
  model = _latest(
    [r for r in records if r["part"] == "spread" and r["kind"] != "learned"],
    lambda r: (r["sigma_ref"], r["kind"]),
  )
  if learned or model:
    lrs = sorted({r["phi_lr"] for r in learned}, reverse=True)
    kinds = list(dict.fromkeys(r["kind"] for r in model))
    head = [f"VSD, eps_phi lr {lr:g} (memorisation lambda: own / fresh)" for lr in lrs]
    lines += [
      "| sigma_ref | " + " | ".join(head + kinds) + " |",
      "|---" * (1 + len(head) + len(kinds)) + "|",
    ]
    for sigma in sorted({r["sigma_ref"] for r in learned + model}):
      cells = []
      for lr in lrs:
        r = next((r for r in learned if r["sigma_ref"] == sigma and r["phi_lr"] == lr), None)
        cells.append(_spread_cell(r))
      for kind in kinds:
        r = next((r for r in model if r["sigma_ref"] == sigma and r["kind"] == kind), None)
        cells.append("" if r is None else f"{r['spread']:.3f}")
      lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
    lines.append("")
  variants = _latest(
    [r for r in records if r["part"] == "variants"], lambda r: (r["variant"], r["sigma_ref"])
  )
  if variants:
    sigmas = sorted({r["sigma_ref"] for r in variants})
    lines += [
      "| toy2d (800 steps, eps_phi lr 1e-3) with | "
      + " | ".join(f"sigma_ref {s:g}" for s in sigmas)
      + " |",
      "|---" * (1 + len(sigmas)) + "|",
    ]
    for label in dict.fromkeys(r["variant"] for r in variants):
      cells = []
      for sigma in sigmas:
        r = next((r for r in variants if r["variant"] == label and r["sigma_ref"] == sigma), None)
        cells.append(_spread_cell(r))
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  coverage = coverage_records(records)
  if coverage:
    lines += [
      "| run | both references covered | particles on the first reference (per run) "
      "| particles that changed reference after the first quarter of the steps |",
      "|---|---|---|---|",
    ]
    for variant in dict.fromkeys(_variant(r) for r in coverage):
      runs = [r for r in coverage if _variant(r) == variant]
      n = variant[2]
      both = sum(len(r["covered"]) == 2 for r in runs)
      shares = ", ".join(str(r["nearest"][-1].count(0)) for r in runs)
      moved = 0  # particles whose nearest reference after the first quarter is not the last
      for r in runs:
        late = np.asarray(r["nearest"])[np.asarray(r["probe_steps"]) >= r["steps"] // 4]
        moved += int(np.sum(np.any(late != late[-1], axis=0)))
      lines.append(
        f"| {_variant_label(*variant)} | {both} of {len(runs)} | {shares} (of {n}) | {moved} |"
      )
    lines.append("")
  return "\n".join(lines)


def _spread_cell(r) -> str:
  """'spread (lambda on its particles / on fresh samples)' of a 2D run, mean lambda over t."""
  if r is None:
    return ""
  mem = r["memorisation"]
  return f"{r['spread']:.3f} ({np.mean(mem['particles']):.2f} / {np.mean(mem['fresh']):.2f})"


def _rgb(colour) -> str:
  return "#" + "".join(f"{round(255 * float(c)):02x}" for c in colour)


def main():
  args = parse_args()
  os.makedirs(args.out, exist_ok=True)
  setting = lambda name: SETTINGS[name][1 if args.quick else 0]
  parts = {
    "cfg": run_cfg,
    "spread": run_spread,
    "variants": run_variants,
    "combined": run_combined,
    "coverage": run_coverage,
    "more_particles": run_more_particles,
    "slow_phi": run_slow_phi,
  }
  chosen = [part for part in args.parts.split(",") if part]  # "": redraw from claims.jsonl
  for part in chosen:
    if part not in parts:
      raise SystemExit(f"--parts: unknown {part!r}; expected some of {', '.join(parts)}")
  for part in chosen:
    parts[part](args.out, setting)
  with open(os.path.join(args.out, "claims.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(args.out, "claims.md"), "w") as f:
    f.write(tables(records))
  spread = [r for r in records if r["part"] == "spread"]
  if spread:
    plot_spread(
      _latest(spread, lambda r: (r["kind"], r.get("phi_lr"), r["sigma_ref"])),
      os.path.join(args.out, "spread.png"),
    )
  if coverage_records(records):
    plot_coverage(coverage_records(records), os.path.join(args.out, "coverage.png"))


if __name__ == "__main__":
  main()
