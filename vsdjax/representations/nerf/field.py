"""The NeRF of one particle: hash grid -> density and albedo, normals, shading.

- A world point x in the scene cube [-bound, bound]^3 maps to the grid by
  (x + bound) / (2 bound) and is encoded by the hash grid (hashgrid.py).
- Two MLPs read the encoding: `density_mlp` -> 1 raw density, `albedo_mlp` ->
  3 raw colours. albedo = sigmoid(raw colours), in [0, 1]; it does not depend
  on the view direction.
- A density bias in world units is added to the raw density before the
  activation, so that training starts from a soft ball at the origin:
    "blob"     (ProlificDreamer's setting):
               blob_density * (1 - |x| / blob_radius),
    "gaussian" (DreamFusion's): blob_density * exp(-|x|^2 / (2 blob_radius^2)),
    "none".
- Density activation: "trunc_exp" (Instant-NGP; exp whose gradient is
  exp(min(x, 15))) or "softplus".
- Normals are analytic: n = -grad_x density / |grad_x density| (of the
  activated density), zero where the gradient vanishes.
- Shading (DreamFusion's diffuse material) with ambient a (0.1) and diffuse
  1 - a (0.9):
    "albedo": albedo,
    "diffuse": albedo * (a + (1 - a) * max(0, n . l)),
    "textureless": (1, 1, 1) * (a + (1 - a) * max(0, n . l)).
  The light is directional: l is one unit vector per render, so the shading
  does not depend on a light distance.
- World frame: z is up (see cameras.py).
"""

import dataclasses
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from vsdjax import checks, mlp
from vsdjax.representations.nerf import hashgrid

DENSITY_ACTIVATIONS = ("trunc_exp", "softplus")
DENSITY_BIASES = ("blob", "gaussian", "none")
SHADINGS = ("albedo", "diffuse", "textureless")

# trunc_exp: the gradient uses exp(min(x, _TRUNC_EXP_GRAD_MAX)) (Instant-NGP).
_TRUNC_EXP_GRAD_MAX = 15.0
# trunc_exp: the value uses exp(min(x, _TRUNC_EXP_MAX)); exp(80) ~ 5.5e34 is
# still finite in float32 (exp overflows past 88.7), so densities never become
# inf (which would make sigma * delta NaN where delta = 0).
_TRUNC_EXP_MAX = 80.0


@jax.custom_vjp
def trunc_exp(x: jnp.ndarray) -> jnp.ndarray:
  """exp(x) with the gradient clamped (Instant-NGP).

  Forward exp(min(x, 80)) (= exp(x) below float32 overflow), backward
  g * exp(min(x, 15)). Supports reverse mode to any order (not forward mode).

  Args:
    x: [...] raw densities.

  Returns:
    [...] densities > 0.
  """
  return jnp.exp(jnp.minimum(x, _TRUNC_EXP_MAX))


def _trunc_exp_fwd(x):
  return trunc_exp(x), x


def _trunc_exp_bwd(x, g):
  return (g * jnp.exp(jnp.minimum(x, _TRUNC_EXP_GRAD_MAX)),)


trunc_exp.defvjp(_trunc_exp_fwd, _trunc_exp_bwd)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """Static settings of a particle's field (defaults: ProlificDreamer stage 1).

  Attributes:
    grid: hash-grid settings.
    bound: the scene is the cube [-bound, bound]^3, world units.
    hidden: width of the hidden layers of both MLPs.
    n_hidden_layers: hidden layers of each MLP (0: linear heads).
    density_activation: one of DENSITY_ACTIVATIONS.
    density_bias: one of DENSITY_BIASES.
    blob_density: scale of the density bias (raw density at the origin).
    blob_radius: world radius of the bias: "blob" reaches 0 there, "gaussian"
      uses it as its standard deviation.
    albedo_init_std: std of a random bias of the raw albedo, drawn per field
      at init (3 values): each particle starts in its own colour,
      sigmoid(N(0, std^2)) per channel, instead of all grey (0). Gives n
      particles different starting basins.
  """

  grid: hashgrid.GridSpec = hashgrid.GridSpec()
  bound: float = 1.0
  hidden: int = 64
  n_hidden_layers: int = 1
  density_activation: str = "trunc_exp"
  density_bias: str = "blob"
  blob_density: float = 10.0
  blob_radius: float = 0.5
  albedo_init_std: float = 0.0

  def __post_init__(self):
    if not isinstance(self.grid, hashgrid.GridSpec):
      raise ValueError(f"FieldSpec.grid must be a hashgrid.GridSpec, got {self.grid!r}")
    checks.check_fields(
      self,
      bound=checks.POSITIVE,
      hidden=checks.integer(1),
      n_hidden_layers=checks.integer(0),
      density_activation=checks.choice(*DENSITY_ACTIVATIONS),
      density_bias=checks.choice(*DENSITY_BIASES),
      blob_density=checks.number(),
      blob_radius=checks.POSITIVE,
      albedo_init_std=checks.NONNEGATIVE,
    )


def init(key: jax.Array, spec: FieldSpec) -> dict:
  """Initial parameters of one field.

  Args:
    key: PRNG key.
    spec: field settings.

  Returns:
    {'grid': {'tables': [L, T, F]}, 'density_mlp': MLP L*F -> 1,
     'albedo_mlp': MLP L*F -> 3} (see mlp.py).
  """
  k_grid, k_density, k_albedo = jax.random.split(key, 3)
  trunk = [spec.grid.n_output] + [spec.hidden] * spec.n_hidden_layers
  albedo_mlp = mlp.init(k_albedo, trunk + [3])
  if spec.albedo_init_std > 0.0:
    # fold_in, not a 4th split: fields with albedo_init_std 0 keep their init.
    last = f"layer_{len(trunk) - 1}"
    bias = spec.albedo_init_std * jax.random.normal(jax.random.fold_in(key, 3), (3,))
    albedo_mlp[last] = dict(albedo_mlp[last], b=bias)
  return {
    "grid": hashgrid.init(k_grid, spec.grid),
    "density_mlp": mlp.init(k_density, trunk + [1]),
    "albedo_mlp": albedo_mlp,
  }


def _safe_norm(x: jnp.ndarray) -> jnp.ndarray:
  """|x| over the last axis, [...]; zero gradient (not NaN) at x = 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-20))


def _safe_normalize(v: jnp.ndarray) -> jnp.ndarray:
  """v / |v| over the last axis, [..., 3]; zero vectors stay zero."""
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  return v * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def density_bias(x: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  """The raw-density bias of `spec.density_bias`, x [..., 3] -> [...]."""
  if spec.density_bias == "blob":
    return spec.blob_density * (1.0 - _safe_norm(x) / spec.blob_radius)
  if spec.density_bias == "gaussian":
    sq = jnp.sum(x * x, axis=-1)
    return spec.blob_density * jnp.exp(-0.5 * sq / spec.blob_radius**2)
  return jnp.zeros(x.shape[:-1], x.dtype)


def _activate(raw: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  if spec.density_activation == "trunc_exp":
    return trunc_exp(raw)
  return jax.nn.softplus(raw)


def _encode(params: dict, x: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  """World points [..., 3] -> grid features [..., L * F]."""
  unit = (x + spec.bound) / (2.0 * spec.bound)  # [..., 3] in [0, 1] inside.
  return hashgrid.encode(params["grid"], unit, spec.grid)


def _density_from(params: dict, feats: jnp.ndarray, x: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  raw = mlp.apply(params["density_mlp"], feats)[..., 0]  # [...]
  return _activate(raw + density_bias(x, spec), spec)


def density(params: dict, x: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  """Volume density at world points.

  Args:
    params: from `init`.
    x: [..., 3] world points (outside the scene cube the grid is clamped).
    spec: field settings.

  Returns:
    [...] density >= 0.
  """
  x = jnp.asarray(x)
  return _density_from(params, _encode(params, x, spec), x, spec)


def density_and_albedo(
  params: dict, x: jnp.ndarray, spec: FieldSpec
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Density and albedo at world points (one grid lookup for both).

  Args:
    params: from `init`.
    x: [..., 3] world points.
    spec: field settings.

  Returns:
    (density [...] >= 0, albedo [..., 3] in [0, 1]).
  """
  x = jnp.asarray(x)
  feats = _encode(params, x, spec)  # [..., L * F]
  albedo = jax.nn.sigmoid(mlp.apply(params["albedo_mlp"], feats))  # [..., 3]
  return _density_from(params, feats, x, spec), albedo


def _with_normal(fn: Callable, x: jnp.ndarray):
  """Evaluates fn(x) -> (density [...], aux) and the analytic normal [..., 3].

  Each density depends on its own point only, so one VJP with ones gives
  every point's gradient.
  """
  dens, vjp_fn, aux = jax.vjp(fn, x, has_aux=True)
  (grad,) = vjp_fn(jnp.ones_like(dens))  # [..., 3]
  return dens, aux, -_safe_normalize(grad)


def normals(params: dict, x: jnp.ndarray, spec: FieldSpec) -> jnp.ndarray:
  """Analytic unit normals -grad density / |grad density|.

  Args:
    params: from `init`.
    x: [..., 3] world points.
    spec: field settings.

  Returns:
    [..., 3] unit normals; zero where the density gradient is zero.
  """
  fn = lambda y: (_density_from(params, _encode(params, y, spec), y, spec), ())
  return _with_normal(fn, jnp.asarray(x))[2]


def shade(
  albedo: jnp.ndarray,
  normal: Optional[jnp.ndarray],
  light_dir: Optional[jnp.ndarray],
  mode: str,
  ambient: float = 0.1,
) -> jnp.ndarray:
  """Colours points for one of the SHADINGS (module docstring).

  Args:
    albedo: [..., 3] in [0, 1].
    normal: [..., 3] unit normals (unused and may be None for "albedo").
    light_dir: [..., 3] or [3] direction towards the light, any length > 0
      (normalised here; unused and may be None for "albedo").
    mode: "albedo", "diffuse" or "textureless".
    ambient: ambient light a in [0, 1]; the diffuse light is 1 - a.

  Returns:
    [..., 3] colours in [0, 1].
  """
  albedo = jnp.asarray(albedo)
  if mode == "albedo":
    return albedo
  normal, light_dir = jnp.asarray(normal), jnp.asarray(light_dir)
  lambert = jnp.maximum(
    jnp.sum(normal * _safe_normalize(light_dir), axis=-1, keepdims=True), 0.0
  )  # [..., 1]
  light = ambient + (1.0 - ambient) * lambert  # [..., 1]
  if mode == "diffuse":
    return albedo * light
  return jnp.broadcast_to(light, albedo.shape)  # "textureless"


def sample_light(
  key: jax.Array, n: int, camera_positions: Optional[jnp.ndarray] = None, perturb: float = 1.0
) -> jnp.ndarray:
  """Random light directions, one per render.

  With `camera_positions` (as DreamFusion): the light sits around
  the camera, l = normalize(camera_position + perturb * N(0, I)), so lit
  sides mostly face the camera (a camera at elevation >= 0 gives mostly
  upper-hemisphere lights). Without cameras: l is uniform on the upper
  hemisphere z >= 0 (z is up) when perturb = 0, and
  normalize(u + perturb * N(0, I)) for such a u otherwise.

  Args:
    key: PRNG key.
    n: number of directions.
    camera_positions: optional [n, 3] camera centres in world units.
    perturb: standard deviation of the Gaussian perturbation, >= 0.

  Returns:
    [n, 3] unit directions towards the light.
  """
  k_centre, k_noise = jax.random.split(key)
  if camera_positions is None:
    g = jax.random.normal(k_centre, (n, 3))  # [n, 3]
    centre = _safe_normalize(g.at[:, 2].set(jnp.abs(g[:, 2])))  # [n, 3]
  else:
    centre = jnp.asarray(camera_positions)  # [n, 3]
  noise = jax.random.normal(k_noise, (n, 3), centre.dtype)  # [n, 3]
  return _safe_normalize(centre + perturb * noise)


def point_fn(
  params: dict,
  spec: FieldSpec,
  shading: str = "albedo",
  light_dir: Optional[jnp.ndarray] = None,
  with_normals: bool = False,
  ambient: float = 0.1,
) -> Callable:
  """The per-sample function the volume renderer calls.

  Args:
    params: one particle's parameters, from `init`.
    spec: field settings.
    shading: one of SHADINGS.
    light_dir: [3] (or broadcastable to the points) direction towards the
      light; required unless shading is "albedo".
    with_normals: also return normals under "albedo" shading (other shadings
      always compute them).
    ambient: ambient light of `shade`.

  Returns:
    f(x [..., 3], d [..., 3]) -> {'density': [...], 'rgb': [..., 3],
    'normal': [..., 3] (only when computed)}. x are world points, d the ray
    directions (unused: the albedo is view-independent).
    Normals cost one extra backward pass through the field.
  """
  need_normal = with_normals or shading != "albedo"

  def f(x: jnp.ndarray, d: jnp.ndarray) -> dict:
    del d
    if not need_normal:
      dens, albedo = density_and_albedo(params, x, spec)
      return {"density": dens, "rgb": albedo}
    dens, albedo, normal = _with_normal(lambda y: density_and_albedo(params, y, spec), x)
    rgb = shade(albedo, normal, light_dir, shading, ambient)
    return {"density": dens, "rgb": rgb, "normal": normal}

  return f
