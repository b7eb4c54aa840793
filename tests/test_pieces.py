"""Connected pieces of host meshes and the removal of small ones (mesh/pieces.py).

References: a union-find loop over the faces' edges, and trimesh's face
adjacency components (what threestudio's remove_outlier splits with).
"""

import numpy as np
import trimesh

from experiments import toy_geometry, toy_texture
from vsdjax.representations.mesh import dmtet, pieces, tetgrid, textured


def _loop_pieces(faces) -> list:
  """The pieces as sorted lists of face indices, by union-find over shared edges."""
  parent = list(range(len(faces)))

  def root(i):
    while parent[i] != i:
      i = parent[i]
    return i

  owner = {}
  for i, face in enumerate(faces):
    for a, b in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
      edge = (min(a, b), max(a, b))
      if edge in owner:
        parent[root(i)] = root(owner[edge])
      else:
        owner[edge] = i
  groups = {}
  for i in range(len(faces)):
    groups.setdefault(root(i), []).append(i)
  return sorted(groups.values())


def _as_groups(labels) -> list:
  return sorted(np.flatnonzero(labels == k).tolist() for k in np.unique(labels))


def _three_pieces():
  """Spheres of 1280 and 80 faces and a 20-face one touching the first at one vertex only."""
  big, mid, small = (trimesh.creation.icosphere(k) for k in (3, 1, 0))
  mid.apply_translation([3.0, 0.0, 0.0])
  small.apply_translation(big.vertices[0] - small.vertices[0])
  verts = np.concatenate([big.vertices, mid.vertices, small.vertices])
  offsets = np.cumsum([0, len(big.vertices), len(mid.vertices)])
  faces = np.concatenate([m.faces + o for m, o in zip((big, mid, small), offsets)])
  # The touching vertex is one vertex: the small sphere reuses the big one's.
  faces[faces == offsets[2]] = 0
  order = np.random.default_rng(0).permutation(len(faces))
  return verts, faces[order]


def test_pieces_match_a_union_find_loop_and_trimesh():
  verts, faces = _three_pieces()
  labels = pieces.face_pieces(faces)
  assert _as_groups(labels) == _loop_pieces(faces)
  adjacency = trimesh.Trimesh(verts, faces, process=False).face_adjacency
  components = trimesh.graph.connected_components(adjacency, nodes=np.arange(len(faces)))
  assert _as_groups(labels) == sorted(sorted(c.tolist()) for c in components)
  assert sorted(np.bincount(labels)) == [20, 80, 1280]
  # Labels count up in order of each piece's first face.
  _, first = np.unique(labels, return_index=True)
  assert np.all(np.diff(first) > 0)
  rng = np.random.default_rng(1)
  for _ in range(20):  # random soups: shared vertices without shared edges, repeated faces
    soup = rng.integers(0, 40, (60, 3))
    assert _as_groups(pieces.face_pieces(soup)) == _loop_pieces(soup.tolist())


def test_drop_small_pieces_keeps_those_of_at_least_int_fraction_times_the_largest():
  verts, faces = _three_pieces()
  sizes = np.bincount(pieces.face_pieces(faces))
  for fraction, kept_sizes in (
    (0.0, [20, 80, 1280]),
    (20 / 1280, [20, 80, 1280]),  # int(20.0) = 20: the 20-face piece stays
    (0.0165, [80, 1280]),  # int(21.12) = 21
    (0.1, [1280]),
    (1.0, [1280]),
  ):
    v, f, dropped = pieces.drop_small_pieces(verts, faces, fraction)
    assert sorted(np.bincount(pieces.face_pieces(f))) == kept_sizes
    assert dropped == len(sizes) - len(kept_sizes)
    # The kept faces are the same triangles, in their order, on the vertices they use.
    keep = np.isin(pieces.face_pieces(faces), np.flatnonzero(sizes >= int(fraction * sizes.max())))
    np.testing.assert_array_equal(v[f], verts[faces[keep]])
    assert f.dtype == np.int64
    if fraction > 0:  # Reindexed to the used vertices; fraction 0 returns the mesh as it is.
      assert len(v) == len(np.unique(f))


def _geometry_particles(config, floater_radius: float):
  """One DMTet particle: a sphere of radius 0.5 and a ball of floater_radius near a corner."""
  grid = tetgrid.kuhn_grid(config.mesh.grid_resolution, config.scene.bound)
  x = grid.verts
  sdf = np.minimum(
    np.linalg.norm(x, axis=-1) - 0.5, np.linalg.norm(x - 0.7, axis=-1) - floater_radius
  )
  sdf = np.clip(sdf, -1.0, 1.0).astype(np.float32)[None]  # [1, V]
  return {"sdf": sdf, "deformation": np.zeros(sdf.shape + (3,), np.float32)}


def test_the_texture_stage_drops_a_floater_of_the_geometry_stage():
  c2 = toy_geometry.get_config()
  c2.mesh.grid_resolution = 16
  c3 = toy_texture.get_config()
  particles = _geometry_particles(c2, 0.15)
  ((verts, faces),) = dmtet.meshes_of(c2, particles)
  sizes = np.bincount(pieces.face_pieces(faces))
  assert len(sizes) == 2 and sizes.min() < 0.1 * sizes.max()

  c3.mesh.outlier_faces = 0.1
  rep = textured.TexturedMesh.from_config(c3, [(c2, particles)])
  assert rep.meshes["face_mask"].sum() == sizes.max()
  assert rep.meshes["verts"][0][rep.meshes["faces"][0]].max() < 0.5 + 1e-6  # the sphere's
  c3.mesh.outlier_faces = 0.0
  rep = textured.TexturedMesh.from_config(c3, [(c2, particles)])
  assert rep.meshes["face_mask"].sum() == len(faces)
