"""Connected pieces of a host mesh, and the removal of the small ones (floaters).

A piece is a set of faces joined through shared edges, the components that
trimesh's `split` finds and threestudio's `isosurface_remove_outliers` drops
when they have fewer faces than a fraction (0.01 by default) of the largest
piece's. The texture stage and the NeRF's mesh export clean their meshes so:
a floater that the normal maps of stage 2 never pulled away would otherwise
take texture (and a UV chart) of its own.
"""

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph


def face_pieces(faces: np.ndarray) -> np.ndarray:
  """[f] int piece label of each face (faces [f, 3]); faces sharing an edge share a label.

  Labels are 0 .. k - 1, numbered in order of each piece's first face.
  """
  faces = np.asarray(faces)
  f = len(faces)
  if f == 0:
    return np.zeros(0, np.int64)
  edges = np.sort(faces[:, [[0, 1], [1, 2], [2, 0]]], axis=-1).reshape(-1, 2)  # [3f, 2]
  _, edge_id = np.unique(edges, axis=0, return_inverse=True)  # [3f]
  edge_id = edge_id.reshape(-1)
  n_edges = int(edge_id.max()) + 1
  # Bipartite graph faces -- edges: two faces are joined when they reach the same edge node.
  rows = np.repeat(np.arange(f), 3)
  graph = sparse.coo_matrix((np.ones(3 * f, np.int8), (rows, f + edge_id)), (f + n_edges,) * 2)
  _, labels = csgraph.connected_components(graph, directed=False)
  _, first, labels = np.unique(labels[:f], return_index=True, return_inverse=True)
  order = np.argsort(np.argsort(first))  # rank of each piece's first face
  return order[labels.reshape(-1)].astype(np.int64)


def drop_small_pieces(verts: np.ndarray, faces: np.ndarray, fraction: float):
  """A host mesh without its pieces of fewer than `fraction` times the largest piece's faces.

  As threestudio's Mesh.remove_outlier with a float threshold: a piece stays
  when its face count is at least int(fraction * largest). fraction 0 returns
  the mesh as it is.

  Args:
    verts: [v, 3] float vertices.
    faces: [f, 3] int vertex indices.
    fraction: in [0, 1]; 1 keeps the largest piece (and any as large) only.

  Returns:
    (verts [v', 3], faces [f', 3] int64, n_dropped): the kept faces in their
    order, reindexed to the vertices they use (in increasing order of their
    old indices), and the number of pieces dropped.
  """
  verts, faces = np.asarray(verts), np.asarray(faces)
  if fraction <= 0 or len(faces) == 0:
    return verts, faces.astype(np.int64), 0
  labels = face_pieces(faces)  # [f]
  sizes = np.bincount(labels)  # [k] faces per piece
  kept = sizes >= int(fraction * sizes.max())  # [k]
  faces = faces[kept[labels]]
  used, inverse = np.unique(faces, return_inverse=True)
  return verts[used], inverse.reshape(faces.shape).astype(np.int64), int(np.sum(~kept))
