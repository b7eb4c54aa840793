"""Geometry under a TPU's default matmul precision.

A TPU computes a float32 matmul or einsum at the default precision as one
bfloat16 pass: both operands rounded to 8 significant bits. XLA:CPU ignores
`jax.default_matmul_precision`, so these tests read the programs instead: every
dot of the geometry (camera rays, volume compositing, marching tets, mesh
normals, the rasterizer, the occupancy grid) must ask for HIGHEST, and the rays
are computed again with each dot that does not ask for it rounded as a TPU
rounds it.
"""

import jax
from jax.extend import core as jex
import jax.numpy as jnp
import numpy as np

from helpers import eqns
from vsdjax import cameras
from vsdjax.prior.analytic import shapes
from vsdjax.representations.mesh import dmtet, geometry, marching_tets, tetgrid
from vsdjax.representations.nerf import occupancy, render

HIGHEST = jax.lax.Precision.HIGHEST
CAMERA = cameras.from_spherical(1.3, 20.0, 35.0, 40.0)


def _rounded_dots(fn, *args) -> list:
  """The float dots of fn(*args) traced as on a TPU that do not ask for HIGHEST."""
  with jax.default_matmul_precision("bfloat16"):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [
    e
    for e in eqns(jaxpr)
    if e.primitive.name == "dot_general"
    and jnp.issubdtype(e.invars[0].aval.dtype, jnp.floating)
    and e.params["precision"] != (HIGHEST, HIGHEST)
  ]


def _sphere_field(x, d):
  del d
  density = 20.0 * jax.nn.sigmoid(-20.0 * shapes.sdf("sphere", x))  # [N]
  normal = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  return {"density": density, "rgb": 0.5 * (normal + 1.0), "normal": normal}


def _sphere_render(c2w, fovy):
  spec = render.RenderSpec(n_samples=16, chunk=8, bound=1.0)
  white = lambda d: jnp.ones_like(d)
  return render.render_image(
    _sphere_field, c2w, fovy, 32, 32, white, spec, jax.random.PRNGKey(0), 256
  )


def _sphere_mesh(resolution: int = 8):
  grid = tetgrid.kuhn_grid(resolution, 1.0)
  sdf = shapes.sdf("sphere", jnp.asarray(grid.verts))
  return grid, sdf


def test_geometry_dots_ask_for_highest():
  grid, sdf = _sphere_mesh()
  max_faces = marching_tets.default_max_faces(grid)

  def mesh_and_views(sdf, deformation, c2w, fovy):
    positions = marching_tets.deform(grid, deformation)
    mesh = marching_tets.marching_tets(grid, sdf, positions, max_faces)
    out = dmtet.render_normals(mesh, c2w, fovy, 32)
    smooth = geometry.normal_consistency(mesh.verts, mesh.faces, mesh.face_mask)
    return out["rgb"], smooth + geometry.laplacian_smoothness(
      mesh.verts, mesh.faces, mesh.face_mask
    )

  density = lambda x: _sphere_field(x, None)["density"]
  programs = {
    "cameras.rays": (lambda c2w, fovy: cameras.rays(c2w, fovy, 64, 64), CAMERA.c2w, CAMERA.fovy),
    "render.render_image": (_sphere_render, CAMERA.c2w, CAMERA.fovy),
    "marching tets, normals, rasterizer": (
      jax.grad(lambda *a: jnp.sum(mesh_and_views(*a)[0]) + mesh_and_views(*a)[1], argnums=(0, 1)),
      sdf,
      jnp.zeros(sdf.shape + (3,)),
      CAMERA.c2w,
      CAMERA.fovy,
    ),
    "occupancy.update": (
      lambda ema, key: occupancy.update(ema, density, 1.0, 0.95, key),
      occupancy.init(8),
      jax.random.PRNGKey(1),
    ),
  }
  for name, (fn, *args) in programs.items():
    rounded = _rounded_dots(fn, *args)
    assert not rounded, f"{name}: dots at a TPU's one-pass bfloat16: {[str(e) for e in rounded]}"


def _as_on_a_tpu(closed: jex.ClosedJaxpr, *args):
  """Evaluates a jaxpr with each float dot that does not ask for HIGHEST given operands
  rounded to bfloat16 (a TPU's default pass: exact products, float32 sums)."""

  def run(jaxpr, consts, *args):
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive.name in ("pjit", "jit"):
        sub = eqn.params["jaxpr"]
        outs = run(sub.jaxpr, sub.consts, *ins)
      else:
        if eqn.primitive.name == "dot_general" and eqn.params["precision"] != (HIGHEST, HIGHEST):
          ins = [x.astype(jnp.bfloat16).astype(x.dtype) for x in ins]
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  return run(closed.jaxpr, closed.consts, *args)


def test_rays_at_512_stay_within_a_fraction_of_a_pixel_on_a_tpu():
  size = 512
  fn = lambda c2w, fovy: cameras.rays(c2w, fovy, size, size)[1]
  with jax.default_matmul_precision("bfloat16"):
    closed = jax.make_jaxpr(fn)(CAMERA.c2w, CAMERA.fovy)
  (directions,) = _as_on_a_tpu(closed, CAMERA.c2w, CAMERA.fovy)
  directions = np.asarray(directions, np.float64)  # [H, W, 3]

  # float64 reference: camera-space pixel directions turned by the camera's rotation.
  c2w, fovy = np.asarray(CAMERA.c2w, np.float64), float(CAMERA.fovy)
  focal = 0.5 * size / np.tan(0.5 * np.deg2rad(fovy))
  centres = np.arange(size) + 0.5 - 0.5 * size
  d_cam = np.stack(
    np.broadcast_arrays(centres[None, :] / focal, -centres[:, None] / focal, -1.0), axis=-1
  )
  want = d_cam @ c2w[:3, :3].T
  want /= np.linalg.norm(want, axis=-1, keepdims=True)

  pixel = 1.0 / focal  # radians per pixel at the centre
  error = np.linalg.norm(directions - want, axis=-1)  # radians, for small angles
  assert error.max() < 0.02 * pixel, error.max() / pixel
  # Neighbouring pixels' rays stay distinct, about one pixel apart.
  for axis in (0, 1):
    step = np.linalg.norm(np.diff(directions, axis=axis), axis=-1)
    assert step.min() > 0.5 * pixel * np.cos(np.deg2rad(fovy) / 2) ** 2
