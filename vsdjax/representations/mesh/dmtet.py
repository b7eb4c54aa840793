"""The DMTet representation (stage 2): a signed distance and a deformation per tet-grid vertex.

One particle is {'sdf': [V], 'deformation': [V, 3]} on a Kuhn tet grid of
`mesh.grid_resolution` cells per axis over the scene cube, or, when the
stage starts from a NeRF and `mesh.fit_box` is on, over the box of the NeRF
particles' surfaces widened by `mesh.box_margin` of its size on each side
and clipped to the scene cube (threestudio's coarse-to-fine isosurface:
a surface on the whole cube first, then the grid on its box, so the cells
are finer where the object is). Its surface is
the marching-tetrahedra mesh of the sdf on the deformed vertices
(marching_tets.py); it renders as a normal map,

    rgb = (n + 1) / 2 over a black background,

with n the interpolated, renormalised area-weighted vertex normal in world
space, antialiased at the silhouettes, which is what the prior sees (the
geometry is refined by SDS on normal maps). Regularisers: normal consistency
and uniform Laplacian smoothness of the mesh (geometry.py).

Initialisation, per particle: from the previous stage's NeRF (its density at
the grid vertices against the iso-level, sdf = clip(iso - density, -1, 1),
negative inside, made solid: regions below the iso-level that the outside
cannot reach are filled, and inside pieces of fewer than 1% of the largest
one's vertices are dropped; normal maps never see either, so SDS could not
remove them), or from an analytic shape's SDF (shapes.py) without one.
The grid's arrays are shared by every particle and travel as a jit argument
(data['shared']); the initial sdf is per particle (data['particle']).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from vsdjax import cameras, checks, console
from vsdjax.prior.analytic import evaluate, shapes
from vsdjax.representations import Representation
from vsdjax.representations.mesh import export, geometry, marching_tets, tetgrid, view
from vsdjax.representations.nerf import field as field_lib, scene

# Points per surface in the chamfer distance, and the grid of the exact surfaces.
_CHAMFER_POINTS = 20_000
_TRUE_SURFACE_RESOLUTION = 64


@dataclasses.dataclass(frozen=True, eq=False)
class DMTet(Representation):
  """The geometry stage's particle (see the module docstring).

  Attributes:
    grid: tetgrid.TetGrid (host arrays; `data()` hands them to jit).
    max_faces: static face budget of marching_tets.
    camera_ranges: cameras.CameraRanges of the training cameras.
    sdf0: [n, V] initial sdf of each particle.
    normal_consistency, laplacian: regulariser weights.
  """

  grid: tetgrid.TetGrid
  max_faces: int
  camera_ranges: cameras.CameraRanges
  sdf0: np.ndarray
  normal_consistency: float = 0.0
  laplacian: float = 0.0

  @classmethod
  def from_config(cls, config, previous=()) -> "DMTet":
    m = config.mesh
    grid = grid_of(config, previous)
    if not previous:
      sdf = np.asarray(shapes.sdf(m.init_shape, jnp.asarray(grid.verts)), np.float32)
      sdf0 = np.tile(sdf[None], (config.n_particles, 1))
    elif previous[0][0].representation == "nerf":
      sdf0 = nerf_sdf(previous[0], grid.verts, m.iso, m.close_holes)
    else:
      raise ValueError(
        f"representation 'dmtet' starts from a 'nerf' run, not {previous[0][0].representation!r}"
      )
    return cls(
      grid=grid,
      max_faces=m.max_faces or marching_tets.default_max_faces(grid),
      camera_ranges=scene.camera_ranges_from_config(config),
      sdf0=sdf0,
      normal_consistency=float(m.normal_consistency),
      laplacian=float(m.laplacian),
    )

  def data(self):
    g = self.grid
    shared = {"verts": g.verts, "tets": g.tets, "edges": g.edges, "tet_edges": g.tet_edges}
    return {"shared": jax.tree.map(jnp.asarray, shared), "particle": {"sdf0": self.sdf0}}

  def _grid(self, shared) -> tetgrid.TetGrid:
    return self.grid._replace(**shared)

  def init(self, key, data):
    del key
    sdf0 = jnp.asarray(data["particle"]["sdf0"])
    return {"sdf": sdf0, "deformation": jnp.zeros(sdf0.shape + (3,), sdf0.dtype)}

  def mesh(self, params, shared) -> marching_tets.Mesh:
    """One particle's mesh (verts [E, 3], faces [M, 3], face_mask [M], ...)."""
    grid = self._grid(shared)
    positions = marching_tets.deform(grid, params["deformation"])  # [V, 3]
    return marching_tets.marching_tets(grid, params["sdf"], positions, self.max_faces)

  def sample_camera(self, key):
    return jax.tree.map(lambda v: v[0], cameras.sample(key, self.camera_ranges, 1))

  def render(self, params, data, camera, resolution, key):
    del key  # Deterministic.
    mesh = self.mesh(params, data["shared"])
    return render_normals(mesh, camera.c2w, camera.fovy, resolution)

  def regularisers(self, out, step):
    del step
    terms = {}
    args = (out["verts"], out["faces"], out["face_mask"])
    if self.normal_consistency > 0:
      terms["normal_consistency"] = self.normal_consistency * geometry.normal_consistency(*args)
    if self.laplacian > 0:
      terms["laplacian"] = self.laplacian * geometry.laplacian_smoothness(*args)
    return terms

  def export(self, particles, data, folder, export_config):
    for i in range(self.sdf0.shape[0]):
      console.say(f"exporting particle {i + 1} (mesh, normal-map video, views) to {folder} ...")
      mesh = self.host_mesh(jax.tree.map(lambda v, i=i: v[i], particles), data["shared"])
      export.export_mesh(mesh, os.path.join(folder, f"particle_{i}"), export_config)

  def host_mesh(self, params, shared):
    """One particle's used mesh on the host: (verts [n, 3], faces [f, 3]); raises on overflow."""
    mesh = _jitted_mesh(self, params, shared)
    marching_tets.check_overflow(mesh)
    return marching_tets.used_mesh(mesh)

  def evaluate(self, particles, data, references, sigma_ref, export_config, size):
    del sigma_ref
    n = self.sdf0.shape[0]
    start = {"sdf": jnp.asarray(self.sdf0), "deformation": jnp.zeros(self.sdf0.shape + (3,))}
    meshes = [
      self.host_mesh(jax.tree.map(lambda v, i=i: v[i], p), data["shared"])
      for p in (particles, start)
      for i in range(n)
    ]
    return evaluate_geometry(meshes[:n], meshes[n:], references, export_config.eval_views, size)


# Compiled once per representation (DMTet hashes by identity), not once per call.
_jitted_mesh = jax.jit(DMTet.mesh, static_argnums=0)


def meshes_of(config, particles, previous=()) -> list:
  """The host meshes [(verts [v, 3], faces [f, 3])] of a geometry-stage run's particles.

  `previous` are the runs that run started from (stages.previous), which its
  grid's box was fitted to.
  """
  # The grid alone is rebuilt from `previous`: the start sdf is unused (the particles' replaces
  # it) and the face budget depends on the resolution only.
  rep = dataclasses.replace(DMTet.from_config(config), grid=grid_of(config, previous))
  shared = rep.data()["shared"]
  n = np.shape(particles["sdf"])[0]
  return [rep.host_mesh(jax.tree.map(lambda v, i=i: v[i], particles), shared) for i in range(n)]


def grid_of(config, previous=()) -> tetgrid.TetGrid:
  """The stage's tet grid: over the scene cube, or, starting from a NeRF run (previous[0])
  with mesh.fit_box on, over the fitted box of that NeRF's surfaces on the cube's grid."""
  m = config.mesh
  grid = tetgrid.kuhn_grid(m.grid_resolution, config.scene.bound)
  if m.fit_box and previous and previous[0][0].representation == "nerf":
    coarse = nerf_sdf(previous[0], grid.verts, m.iso, m.close_holes)  # [n, V]
    grid = tetgrid.in_box(grid, *fitted_box(grid, coarse, m.box_margin, config.scene.bound))
  return grid


def nerf_sdf(
  previous, points: np.ndarray, iso: float, close: int = 0, batch: int = 65_536
) -> np.ndarray:
  """[n, V] sdf = clip(iso - density, -1, 1) of the previous stage's NeRF particles at points.

  Made solid (see `solid`, which `close` is passed to). Raises checks.ConfigError
  naming mesh.iso when a particle's density never exceeds it (no surface).
  """
  prev_config, particles = previous
  spec = scene.spec_from_config(prev_config).field
  density = jax.jit(lambda p, x: field_lib.density(p, x, spec))
  out = []
  for i in range(jax.tree.leaves(particles)[0].shape[0]):
    params = jax.tree.map(lambda v, i=i: jnp.asarray(v[i]), particles["field"])
    dens = np.concatenate(
      [np.asarray(density(params, points[s : s + batch])) for s in range(0, len(points), batch)]
    )
    if not np.any(dens > iso):
      raise checks.ConfigError(
        f"config field mesh.iso={iso}: particle {i}'s NeRF density never exceeds it on the "
        f"grid (max {dens.max():.4g}), so it has no surface; lower mesh.iso"
      )
    out.append(solid(np.clip(iso - dens, -1.0, 1.0).astype(np.float32), close))
  return np.stack(out)


def surface_box(grid: tetgrid.TetGrid, sdf: np.ndarray):
  """(lo [3], hi [3]): the box of sdf's zero crossings on the grid's edges (its mesh's vertices).

  Where the sdf has no crossing, the grid's box.
  """
  a, b = np.asarray(sdf)[grid.edges.T]  # [E] each
  cut = (a > 0) != (b > 0)
  if not np.any(cut):
    return tuple(np.asarray(c, np.float64) for c in grid.box)
  a, b = a[cut].astype(np.float64), b[cut].astype(np.float64)
  va, vb = (grid.verts[grid.edges[cut, k]].astype(np.float64) for k in (0, 1))  # [c, 3] each
  x = va + (a / (a - b))[:, None] * (vb - va)  # [c, 3]
  return x.min(axis=0), x.max(axis=0)


def fitted_box(grid: tetgrid.TetGrid, sdf: np.ndarray, margin: float, bound: float):
  """(lo [3], hi [3]): the union of the particles' surface boxes (sdf [n, V] on the grid),
  widened by margin times its size (at least half a cell, so that a flat object's box is not
  empty) on each side and clipped to [-bound, bound]^3."""
  boxes = [surface_box(grid, s) for s in sdf]
  lo = np.min([b[0] for b in boxes], axis=0)
  hi = np.max([b[1] for b in boxes], axis=0)
  pad = np.maximum(margin * (hi - lo), 0.5 * grid.cell_size)
  return np.maximum(lo - pad, -bound), np.minimum(hi + pad, bound)


def solid(sdf: np.ndarray, close: int = 0, min_piece: float = 0.01) -> np.ndarray:
  """sdf [V] on a Kuhn grid's vertex lattice with its cavities filled and small pieces dropped.

  Outside (sdf > 0) regions not connected to the grid's boundary become
  inside (-1). With close = k > 0, so do those connected to it only through
  openings narrower than about 2k vertices: the inside is dilated k times,
  its cavities filled, and the result eroded k times (3 x 3 x 3 cubes), so a hollow NeRF shell
  with holes becomes a solid while the outer surface stays where it was.
  Then inside regions (6-connected) with fewer vertices than min_piece times
  the largest one's become outside (+1).
  """
  n = round(len(sdf) ** (1.0 / 3.0))
  grid = sdf.reshape(n, n, n)
  inside = grid <= 0
  filled = _fill_cavities(inside)
  if close:
    cube = np.ones((3, 3, 3), bool)
    dilated = ndimage.binary_dilation(inside, cube, iterations=close)
    closed = ~ndimage.binary_dilation(~_fill_cavities(dilated), cube, iterations=close)
    filled |= closed
  grid = np.where(filled & ~inside, -1.0, grid)
  pieces, count = ndimage.label(grid <= 0)
  if count > 1:
    sizes = np.bincount(pieces.ravel())[1:]  # [count]
    small = np.concatenate([[False], sizes < min_piece * sizes.max()])
    grid = np.where(small[pieces], 1.0, grid)
  return grid.reshape(-1).astype(np.float32)


def _fill_cavities(inside: np.ndarray) -> np.ndarray:
  """inside [n, n, n] bool with the outside regions that do not reach the boundary added."""
  outside, _ = ndimage.label(~inside)
  faces = (
    outside[0],
    outside[-1],
    outside[:, 0],
    outside[:, -1],
    outside[:, :, 0],
    outside[:, :, -1],
  )
  border = np.unique(np.concatenate([f.ravel() for f in faces]))
  return inside | ((outside > 0) & ~np.isin(outside, border[border > 0]))


def render_normals(mesh, c2w, fovy, size: int, antialias: bool = True) -> dict:
  """The normal map of a mesh: 'rgb' (n + 1) / 2 on black, 'opacity', and the mesh arrays.

  antialias False: sampled at the pixel centres only (view.finish).
  """
  faces, face_mask = mesh.faces, mesh.face_mask
  normals = geometry.vertex_normals(mesh.verts, faces, face_mask)  # [E, 3]
  v = view.draw(mesh.verts, faces, face_mask, c2w, fovy, size)
  n = view.attribute(v, normals, faces)  # [H, W, 3]
  n = n * jax.lax.rsqrt(jnp.maximum(jnp.sum(n * n, axis=-1, keepdims=True), 1e-12))
  rgb = v.mask[..., None] * 0.5 * (n + 1.0)  # [H, W, 3], black background
  rgb, opacity = view.finish(v, rgb, faces, face_mask, antialias)
  return {
    "rgb": rgb,
    "opacity": opacity,
    "verts": mesh.verts,
    "faces": faces,
    "face_mask": face_mask,
    "metrics": {
      "mesh_faces": mesh.n_faces,
      "mesh_face_overflow": mesh.overflow.astype(jnp.int32),
      "raster_tile_overflow": v.overflow,
    },
  }


def _true_surface(shape: str, bound: float, key) -> np.ndarray:
  """[_CHAMFER_POINTS, 3] points on the exact surface of a reference shape."""
  grid = tetgrid.kuhn_grid(_TRUE_SURFACE_RESOLUTION, bound)
  verts = jnp.asarray(grid.verts)
  mesh = marching_tets.marching_tets(
    grid, shapes.sdf(shape, verts), verts, marching_tets.default_max_faces(grid)
  )
  points = geometry.sample_surface(key, mesh.verts, mesh.faces, mesh.face_mask, _CHAMFER_POINTS)
  # Marching tets cuts the corners of the linear interpolation; project onto the zero set.
  grad = jax.vmap(jax.grad(lambda p: shapes.sdf(shape, p)))(points)
  return np.asarray(points - shapes.sdf(shape, points)[:, None] * grad)


def _chamfer(mesh, surface, key) -> float:
  verts, faces = (jnp.asarray(a) for a in mesh)
  mask = jnp.ones(faces.shape[0], bool)
  points = geometry.sample_surface(key, verts, faces, mask, _CHAMFER_POINTS)
  return float(geometry.chamfer(points, jnp.asarray(surface)))


def evaluate_geometry(meshes, start_meshes, references, n_views: int, size: int) -> dict:
  """eval.json of the geometry stage.

  Per particle i, against each reference k: `chamfer` [n, K] (scene units,
  mesh vs exact surface), `init_chamfer` [n, K] (the mesh the stage started
  from) and `normal_psnr` [n, K] (held-out normal maps, sampled at the pixel
  centres as the references are); `nearest` [n] is the reference of the best
  normal PSNR.
  """
  names = evaluate.unique_names([r.shape for r in references])
  key = jax.random.PRNGKey(0)
  surfaces = [_true_surface(r.shape, shapes.BOUND_RADIUS + 0.1, key) for r in references]
  cams = evaluate.heldout_cameras(n_views)
  ref = shapes.render_views(references, cams.c2w, cams.fovy, size, size)["normal_rgb"]
  ref = np.asarray(ref, np.float64)  # [V, K, H, W, 3]
  draw = jax.jit(lambda m, c2w, fovy: render_normals(m, c2w, fovy, size, False)["rgb"])
  chamfer, init_chamfer, psnr = [], [], []
  for mesh, start in zip(meshes, start_meshes):
    chamfer.append([_chamfer(mesh, s, key) for s in surfaces])
    init_chamfer.append([_chamfer(start, s, key) for s in surfaces])
    m = marching_tets.from_host(*mesh)
    rgb = np.stack([np.asarray(draw(m, c, f)) for c, f in zip(cams.c2w, cams.fovy)])  # [V, H, W, 3]
    mse = np.mean(np.square(rgb[:, None] - ref), axis=(0, 2, 3, 4))  # [K]
    psnr.append(evaluate.psnr(mse))
  psnr = np.asarray(psnr)
  return {
    "references": names,
    "chamfer": np.asarray(chamfer).tolist(),
    "init_chamfer": np.asarray(init_chamfer).tolist(),
    "normal_psnr": psnr.tolist(),
    "nearest": [names[k] for k in np.argmax(psnr, axis=1)],
    "n_views": n_views,
    "size": size,
  }
