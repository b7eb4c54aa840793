"""Argument checks used across the package, errors a user can fix, and the config check.

Argument checks (`check_int`, `check_number`, `check_range`, `check_finite`)
raise ValueError naming the argument; the array ones skip traced values (they
check concrete inputs at public entry points and cost nothing under jit).
Every settings dataclass checks and normalises its fields with `check_fields`, using
the rules (`integer`, `number`, `interval`, `choice`, ...) that the config fields use.

`validate_config(config)` runs before anything is built or written: every field
of `defaults.py` with a closed set of values or a range is checked here, the
settings dataclasses (scene, render, cameras, eps_phi) are built once to apply
their own checks, and a field the defaults do not have (a typo in an
experiment file) is refused. Each message names the config field and what it
accepts.
"""

import difflib
import math
import re

import jax
import ml_collections
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds actual values (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def concrete(x):
  """x as a numpy array, or None when it is traced (checks are skipped)."""
  return np.asarray(x) if is_concrete(x) else None


def check_finite(name: str, x) -> None:
  """Raises ValueError naming `name` if a concrete `x` holds NaN or inf."""
  value = concrete(x)
  if value is not None and not np.all(np.isfinite(value)):
    raise ValueError(f"{name}: contains non-finite values")


def check_range(
  name: str, x, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
  """Raises ValueError naming `name` if a concrete `x` leaves [low, high] (or the open ends)."""
  v = concrete(x)
  if v is None:
    return
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if np.any(below) or np.any(above):
    lb, hb = ("(" if low_open else "["), (")" if high_open else "]")
    raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {v!r}")


def check_int(name: str, value, minimum: int = 1) -> int:
  """`value` as an int >= minimum (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_number(name: str, value, low: float, high: float, closed: bool = False) -> float:
  """`value` as a finite float in (low, high), or [low, high] if `closed`."""
  try:
    number = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a number, got {value!r}") from e
  check_finite(name, number)
  check_range(name, number, low, high, low_open=not closed, high_open=not closed)
  return number


class UserError(Exception):
  """An error the user can fix; the command line prints it as one line."""

  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config field has a value the code does not accept."""


class ModelLoadError(UserError):
  """A model named by a config field cannot be loaded (missing, offline, broken)."""


def _fail(field: str, message: str):
  raise ConfigError(f"{field}: {message}")


def _interval(lo, hi, lo_open=False, hi_open=False) -> str:
  if hi is None:
    return f"> {lo}" if lo_open else f">= {lo}"
  if lo is None:
    return f"< {hi}" if hi_open else f"<= {hi}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _outside(v, lo, hi, lo_open, hi_open) -> bool:
  below = lo is not None and (v <= lo if lo_open else v < lo)
  above = hi is not None and (v >= hi if hi_open else v > hi)
  return below or above


# Rules: `rule(field, value)` returns the value normalised (Python int / float /
# tuple) or raises ConfigError "<field>: must be ...". validate_config applies
# them to config fields, `check_fields` to the fields of settings dataclasses.


def integer(lo=None, hi=None):
  def check(field, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      _fail(field, f"must be an integer, got {v!r}")
    if _outside(v, lo, hi, False, False):
      _fail(field, f"must be an integer {_interval(lo, hi)}, got {v!r}")
    return int(v)

  return check


def number(lo=None, hi=None, lo_open=False, hi_open=False):
  def check(field, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      _fail(field, f"must be a number, got {v!r}")
    if not math.isfinite(v):
      _fail(field, f"must be finite, got {v!r}")
    if _outside(v, lo, hi, lo_open, hi_open):
      _fail(field, f"must be {_interval(lo, hi, lo_open, hi_open)}, got {v!r}")
    return float(v)

  return check


def interval(lo=None, hi=None, lo_open=False, hi_open=False):
  """A (min, max) pair of numbers with min <= max, both within the bounds."""
  bound = number(lo, hi, lo_open, hi_open)

  def check(field, v):
    try:
      low, high = v
    except (TypeError, ValueError):
      _fail(field, f"must be a (min, max) pair of numbers, got {v!r}")
    pair = (bound(field, low), bound(field, high))
    if pair[0] > pair[1]:
      _fail(field, f"needs min <= max, got {v!r}")
    return pair

  return check


def choice(*values):
  def check(field, v):
    if v not in values:
      _fail(field, f"must be one of {', '.join(repr(x) for x in values)}; got {v!r}")
    return v

  return check


def optional(rule):
  """`rule`, or None."""
  return lambda field, v: None if v is None else rule(field, v)


def boolean(field, v):
  if not isinstance(v, bool):
    _fail(field, f"must be True or False, got {v!r}")
  return v


def string(field, v):
  if not isinstance(v, str):
    _fail(field, f"must be a string, got {v!r}")
  return v


def nonempty_string(field, v):
  if not isinstance(v, str) or not v.strip():
    _fail(field, f"must be a non-empty string, got {v!r}")
  return v


def check_fields(spec, **rules) -> None:
  """Applies `rules` ({field: rule}) to the fields of a frozen dataclass, in place.

  The one check path of every settings dataclass: each field is checked and
  normalised (Python int / float, float tuples) by the rule, and an error
  names the class and the field, as "GridSpec.n_levels: must be an integer
  >= 1, got 0".
  """
  cls = type(spec).__name__
  for name, rule in rules.items():
    object.__setattr__(spec, name, rule(f"{cls}.{name}", getattr(spec, name)))


def _by_dataclass(field, v):
  del field  # Checked by the settings dataclass that reads it (validate_config builds it).
  return v


POSITIVE = number(0.0, lo_open=True)
NONNEGATIVE = number(0.0)
UNIT = number(0.0, 1.0)  # probabilities, and t as a fraction of the diffusion steps

# One rule per field of defaults.get_config(); a field without a rule is
# unknown. `_by_dataclass` marks fields that a settings dataclass checks.
RULES = {
  "seed": integer(0, 2**32 - 1),
  "steps": integer(0),
  "n_particles": integer(1),
  "views_per_step": integer(1),
  "mode": choice("train", "export"),
  "representation": choice("nerf", "image", "dmtet", "textured_mesh"),
  "init_from": string,
  "prompt": string,
  "guidance.mode": choice("vsd", "sds"),
  "guidance.scale": NONNEGATIVE,
  "guidance.t_min": UNIT,
  "guidance.t_max": UNIT,
  "guidance.t_max_after": UNIT,
  "guidance.t_switch_step": integer(0),
  "guidance.t_anneal_steps": integer(0),
  "guidance.grad_clip": NONNEGATIVE,
  "guidance.view_prompts": boolean,
  "guidance.front_threshold": number(0.0, 180.0),
  "guidance.back_threshold": number(0.0, 180.0),
  "prior.kind": choice("stable_diffusion", "analytic"),
  "prior.name": nonempty_string,
  "prior.dtype": choice("float32", "bfloat16", "auto"),
  "prior.attention": choice("fused", "xla", "diffusers"),
  "prior.references": string,
  "prior.sigma_ref": NONNEGATIVE,
  "prior.reference_size": integer(1),
  "prior.reference_render": choice("rgb", "normal"),
  "eps_phi.base": nonempty_string,
  "eps_phi.mode": choice("lora", "full"),
  "eps_phi.rank": integer(1),
  "eps_phi.alpha": number(),
  "eps_phi.lr": POSITIVE,
  "eps_phi.weight_decay": NONNEGATIVE,
  "eps_phi.camera_dropout": UNIT,
  "eps_phi.steps_per_step": integer(1),
  "eps_phi.tiny_channels": _by_dataclass,
  "eps_phi.batch_with_prior": boolean,
  "scene.bound": _by_dataclass,
  "scene.n_levels": _by_dataclass,
  "scene.n_features": _by_dataclass,
  "scene.log2_table_size": _by_dataclass,
  "scene.base_resolution": _by_dataclass,
  "scene.per_level_scale": _by_dataclass,
  "scene.hidden": _by_dataclass,
  "scene.density_activation": _by_dataclass,
  "scene.blob_density": _by_dataclass,
  "scene.blob_radius": _by_dataclass,
  "scene.albedo_init_std": _by_dataclass,
  "scene.shading": _by_dataclass,
  "scene.background": _by_dataclass,
  "scene.random_bg_prob": _by_dataclass,
  "mesh.grid_resolution": integer(2, 512),
  "mesh.max_faces": integer(0),
  "mesh.iso": number(),
  "mesh.fit_box": boolean,
  "mesh.box_margin": NONNEGATIVE,
  "mesh.close_holes": integer(0, 16),
  "mesh.init_shape": nonempty_string,
  "mesh.normal_consistency": NONNEGATIVE,
  "mesh.laplacian": NONNEGATIVE,
  "mesh.supersample": integer(1, 8),
  "mesh.outlier_faces": UNIT,
  "mesh.texture_from_nerf": boolean,
  "render.resolution": integer(1),
  "render.resolution_after": integer(1),
  "render.resolution_step": integer(0),
  "render.n_samples": _by_dataclass,
  "render.chunk": _by_dataclass,
  "render.ray_batch": integer(0),
  "render.occupancy_grid": integer(0, 512),
  "render.occupancy_threshold": UNIT,
  "render.occupancy_decay": UNIT,
  "render.occupancy_every": integer(1),
  "camera.radius": _by_dataclass,
  "camera.elevation": _by_dataclass,
  "camera.azimuth": _by_dataclass,
  "camera.fovy": _by_dataclass,
  "camera.sphere_prob": _by_dataclass,
  "optim.lr": POSITIVE,
  "optim.grid_lr": POSITIVE,
  "optim.b1": number(0.0, 1.0),
  "optim.b2": number(0.0, 1.0),
  "optim.eps": NONNEGATIVE,
  "optim.weight_decay": NONNEGATIVE,
  "loss.sparsity": NONNEGATIVE,
  "loss.opaque": NONNEGATIVE,
  "loss.opaque_step": integer(0),
  "loss.entropy": NONNEGATIVE,
  "loss.orientation": NONNEGATIVE,
  "sharding.particles": integer(0),
  "sharding.views": integer(0),
  "log_every": integer(1),
  "preview_every": integer(0),
  "checkpoint_every": integer(1),
  "keep_checkpoints": integer(1),
  "compile_cache": string,
  "export.views": integer(1),
  "export.video_frames": integer(1),
  "export.resolution": integer(8),
  "export.mesh_resolution": integer(2),
  "export.mesh_threshold": number(),
  "export.mesh_outlier_faces": UNIT,
  "export.eval_views": integer(1),
  "export.texture_size": integer(8),
}

# Settings dataclass names in their messages -> the config section they read.
_SPEC_SECTIONS = {
  "GridSpec": "scene",
  "FieldSpec": "scene",
  "RenderSpec": "render",
  "CameraRanges": "camera",
  "SceneSpec": "scene",
  "EpsPhiSpec": "eps_phi",
}


def flatten(config) -> dict:
  """{'a.b': value} of a ConfigDict or nested dict (tuples and lists as lists)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, (ml_collections.ConfigDict, dict)):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = list(v) if isinstance(v, (tuple, list)) else v

  walk(config, "")
  return out


def _config_fail(field: str, message: str):
  _fail(f"config field {field}", message)


def _spec_error(section: str, e: ValueError) -> ConfigError:
  """A settings dataclass's ValueError, with its field named as in the config."""
  msg = re.sub(
    rf"\b({'|'.join(_SPEC_SECTIONS)})\.(\w+)",
    lambda m: f"{_SPEC_SECTIONS[m.group(1)]}.{m.group(2)}",
    str(e),
  )
  return ConfigError(f"config section {section}: {msg}")


def validate_config(config) -> None:
  """Raises ConfigError naming the first field `config` cannot run with.

  Checks: unknown and missing fields against RULES, each field's type and
  range or closed set, the relations between fields, and the settings
  dataclasses built from the config. Builds no model and touches no file.
  """
  # Deferred: these modules import jax-heavy code; checks.py stays importable alone.
  from vsdjax import cameras
  from vsdjax.guidance import eps_phi
  from vsdjax.prior.analytic import mixture, shapes
  from vsdjax.representations.nerf import scene
  from vsdjax.training import models

  flat = flatten(config)
  for field in sorted(set(flat) - set(RULES)):
    near = difflib.get_close_matches(field, RULES, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise ConfigError(
      f"config field {field} is unknown{hint}; every field is listed "
      "and commented in vsdjax/defaults.py"
    )
  for field in sorted(set(RULES) - set(flat)):
    raise ConfigError(
      f"config field {field} is missing; derive the config from vsdjax.defaults.get_config()"
    )
  for field, rule in RULES.items():
    rule(f"config field {field}", flat[field])

  g = config.guidance
  for name in ("t_max", "t_max_after"):
    if g.t_min > g[name]:
      _config_fail(f"guidance.{name}", f"must be >= guidance.t_min = {g.t_min}, got {g[name]}")
  try:
    cameras.check_thresholds(g.front_threshold, g.back_threshold)
  except ValueError as e:
    _config_fail("guidance.front_threshold / back_threshold", str(e))
  analytic = config.prior.kind == "analytic"
  if config.representation == "image" and not analytic:
    _config_fail(
      "representation", "'image' (particles are pixel images) needs prior.kind = 'analytic'"
    )
  vsd = config.guidance.mode == "vsd"
  if vsd and analytic and config.eps_phi.base != "tiny":
    _config_fail(
      "eps_phi.base",
      "with prior.kind = 'analytic' it must be 'tiny' (a small "
      f"pixel-space UNet), got {config.eps_phi.base!r}",
    )
  if vsd and not analytic and config.eps_phi.base == "tiny":
    _config_fail(
      "eps_phi.base",
      "'tiny' is for the analytic prior; with Stable Diffusion "
      "pass 'prior' or a model (hub id or local folder)",
    )
  if analytic:
    try:
      refs = shapes.parse_references(config.prior.references)
    except ValueError as e:
      _config_fail("prior.references", str(e))
    names = [shapes.component_name(r) for r in refs]
    try:
      mixture.encode_prompts(mixture.make_prior(names, 0.0), [config.prompt])
    except ValueError as e:
      _config_fail("prompt", str(e))
    # A colour no reference has would select by the shape alone: say so instead.
    colours = set(re.findall(r"\w+", config.prompt.lower())) & set(shapes.COLOUR_NAMES)
    unknown = sorted(colours - {shapes.colour_name(r.color) for r in refs})
    if unknown:
      _config_fail(
        "prompt",
        f"{config.prompt!r} names {', '.join(unknown)}, a colour no reference has; "
        f"the references are {', '.join(names)} (prior.references)",
      )
  if config.mesh.init_shape not in shapes.SHAPES:
    _config_fail(
      "mesh.init_shape", f"must be one of {shapes.SHAPES}, got {config.mesh.init_shape!r}"
    )
  if config.representation == "textured_mesh" and not config.init_from:
    _config_fail("init_from", "'textured_mesh' starts from a geometry run; name its work directory")
  if vsd:
    try:
      if analytic:
        models.tiny_unet_config(config.eps_phi.tiny_channels, config.render.resolution)
        factor = 2 ** (len(config.eps_phi.tiny_channels) - 1)
        for name in ("resolution", "resolution_after"):
          if config.render[name] % factor:
            _config_fail(
              f"render.{name}",
              f"must be a multiple of {factor} (the tiny eps_phi "
              f"UNet halves it {factor.bit_length() - 1} times), got {config.render[name]}",
            )
      eps_phi.EpsPhiSpec(
        mode=config.eps_phi.mode,
        rank=config.eps_phi.rank,
        alpha=config.eps_phi.alpha,
        camera_dropout=config.eps_phi.camera_dropout,
      )
    except (ValueError, TypeError) as e:
      raise _spec_error("eps_phi", e) from e
  for section, build in (
    ("scene / render", scene.spec_from_config),
    ("camera", scene.camera_ranges_from_config),
  ):
    try:
      build(config)
    except (ValueError, TypeError) as e:
      raise _spec_error(section, e) from e
