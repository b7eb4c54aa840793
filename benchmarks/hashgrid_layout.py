"""Hash-grid table layouts: encode forward and forward + backward, one JSON line per case.

  python benchmarks/hashgrid_layout.py [--points 262144] [--xla-flags none|ftz_atomics|gpu_ftz]

Forward + backward is `value_and_grad` of a random projection of the features
w.r.t. the tables (as field.py).

Layouts of the same parameters (default GridSpec: 16 levels, F = 2, T = 2^19; its
5 coarse levels, 16^3 .. 71^3 cells, fit the table and are indexed densely):

  current       hashgrid.encode: one [L, T, F] table; a coarse level uses the first
                res^3 rows of its [T, F] slice; [8, L, N] rows (points minor), one
                gather per feature, backward one scatter-add per feature into [L * T].
  split         [N, L, 8] rows gathered as [.., F] rows, the coarse and the hashed
                levels apart (two gathers from the same [L * T, F] table).
  dense         the coarse levels in their own rows, [sum_l size_l, F] (0.53M rows
                instead of 5 * 2^19), the hashed levels in [L_h, T, F]: two gathers,
                two scatter-adds into smaller tables.
  dense_sorted  dense, with the coarse levels' backward a sort of the rows and a
                sorted segment_sum instead of the scatter-add: the coarse rows are
                the ones that many points hit (jax-ml/jax#38806 on GPUs).

Each row also gives the largest difference to `current` of the features and of
the table gradient (mapped back to the [L, T, F] layout).

--xla-flags sets XLA_FLAGS before the backend starts (one setting per process):
ftz_atomics = --xla_backend_extra_options=-nvptx-allow-ftz-atomics (native f32
atomics in GPU scatters under jaxlib 0.10.2-0.11.0), gpu_ftz = --xla_gpu_ftz=true
(flush denormals in every GPU kernel, which also allows them); both are no-ops on CPUs.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vsdjax.representations.nerf import hashgrid
from xla_memory import measure, run_info

XLA_FLAGS = {
  "none": "",
  "ftz_atomics": hashgrid.FTZ_ATOMICS_FLAG,
  "gpu_ftz": "--xla_gpu_ftz=true",
}


def coarse_levels(spec: hashgrid.GridSpec) -> int:
  """Number K of dense levels; they are levels 0 .. K-1 (resolution grows with l)."""
  dense = hashgrid.levels(spec).dense
  k = int(dense.sum())
  assert dense[:k].all(), "dense levels must come first"
  return k


def to_dense(tables: jnp.ndarray, spec: hashgrid.GridSpec) -> dict:
  """[L, T, F] tables -> {'dense': [sum_l<K size_l, F], 'hashed': [L - K, T, F]}."""
  k, size = coarse_levels(spec), hashgrid.levels(spec).size
  dense = jnp.concatenate([tables[l, : size[l]] for l in range(k)])
  return {"dense": dense, "hashed": tables[k:]}


def from_dense(params: dict, spec: hashgrid.GridSpec) -> jnp.ndarray:
  """Inverse of to_dense; the unused rows of coarse levels are 0."""
  k, size, t = coarse_levels(spec), hashgrid.levels(spec).size, spec.table_size
  start = np.concatenate([[0], np.cumsum(size[:k])])
  coarse = [
    jnp.pad(params["dense"][start[l] : start[l + 1]], ((0, t - size[l]), (0, 0))) for l in range(k)
  ]
  return jnp.concatenate([jnp.stack(coarse), params["hashed"]])


@jax.custom_vjp
def gather_sorted_backward(table: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
  """table[rows] ([M, F] from [R, F] and [M] int32), backward by sorted segment_sum."""
  return table.at[rows].get(mode="promise_in_bounds")


def _gather_fwd(table, rows):
  return gather_sorted_backward(table, rows), (rows, table.shape[0])


def _gather_bwd(res, g):
  rows, n_rows = res
  order = jnp.argsort(rows)  # [M]
  grad = jax.ops.segment_sum(g[order], rows[order], n_rows, indices_are_sorted=True)
  return grad, None


gather_sorted_backward.defvjp(_gather_fwd, _gather_bwd)


def encode_dense(params: dict, x: jnp.ndarray, spec: hashgrid.GridSpec, sorted_bwd: bool):
  """hashgrid.encode on the dense layout; x: [N, 3] float32 -> [N, L * F]."""
  k, size, t = coarse_levels(spec), hashgrid.levels(spec).size, spec.table_size
  n_feat = spec.n_features
  row, weights = (a.transpose(2, 1, 0) for a in hashgrid.corners(x, spec))  # [N, L, 8] each
  start = jnp.asarray(np.concatenate([[0], np.cumsum(size[: k - 1])])[:, None], jnp.int32)
  coarse_rows = (row[:, :k] + start).reshape(-1)  # [N * K * 8]
  if sorted_bwd:
    coarse = gather_sorted_backward(params["dense"], coarse_rows)
  else:
    coarse = params["dense"].at[coarse_rows].get(mode="promise_in_bounds")
  hashed_start = jnp.asarray(np.arange(spec.n_levels - k)[:, None] * t, jnp.int32)
  hashed = (
    params["hashed"].reshape(-1, n_feat).at[row[:, k:] + hashed_start].get(mode="promise_in_bounds")
  )  # [N, L - K, 8, F]
  feats = jnp.concatenate([coarse.reshape(len(x), k, 8, n_feat), hashed], axis=1)
  return jnp.sum(weights[..., None] * feats, axis=-2).reshape(len(x), -1)  # [N, L * F]


def encode_split(params: dict, x: jnp.ndarray, spec: hashgrid.GridSpec):
  """hashgrid.encode with the coarse and the hashed levels gathered apart (same table)."""
  k, t, n_feat = coarse_levels(spec), spec.table_size, spec.n_features
  flat = params["tables"].reshape(-1, n_feat)  # [L * T, F]
  row, weights = (a.transpose(2, 1, 0) for a in hashgrid.corners(x, spec))  # [N, L, 8] each
  row = row + jnp.asarray(np.arange(spec.n_levels)[:, None] * t, jnp.int32)
  coarse = flat.at[row[:, :k]].get(mode="promise_in_bounds")  # [N, K, 8, F]
  hashed = flat.at[row[:, k:]].get(mode="promise_in_bounds")  # [N, L - K, 8, F]
  feats = jnp.concatenate([coarse, hashed], axis=1)  # [N, L, 8, F]
  return jnp.sum(weights[..., None] * feats, axis=-2).reshape(len(x), -1)  # [N, L * F]


def variants(spec):
  """name -> (encode(params, x), params from [L, T, F] tables, gradient -> [L, T, F])."""
  same = lambda p: p
  dense_in = lambda tables: to_dense(tables, spec)
  dense_out = lambda g: from_dense(g, spec)
  return {
    "current": (lambda p, x: hashgrid.encode(p, x, spec), lambda t: {"tables": t}, same),
    "split": (lambda p, x: encode_split(p, x, spec), lambda t: {"tables": t}, same),
    "dense": (lambda p, x: encode_dense(p, x, spec, False), dense_in, dense_out),
    "dense_sorted": (lambda p, x: encode_dense(p, x, spec, True), dense_in, dense_out),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=2**18)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--xla-flags", choices=sorted(XLA_FLAGS), default="none")
  parser.add_argument("--variants", default="current,split,dense,dense_sorted")
  args = parser.parse_args()
  # XLA reads XLA_FLAGS once, when the first computation starts the backend.
  flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), XLA_FLAGS[args.xla_flags]) if f)
  if flags:
    os.environ["XLA_FLAGS"] = flags

  spec = hashgrid.GridSpec()
  key_t, key_x, key_c = jax.random.split(jax.random.PRNGKey(0), 3)
  tables = jax.random.uniform(key_t, (spec.n_levels, spec.table_size, spec.n_features), minval=-1)
  x = jax.random.uniform(key_x, (args.points, 3))  # [N, 3]
  cot = jax.random.normal(key_c, (args.points, spec.n_output))  # [N, L * F]
  reference = {}
  for name, (encode, params_of, grad_to_tables) in variants(spec).items():
    if name not in args.variants.split(","):
      continue
    params = params_of(tables)
    loss = lambda p, x, encode=encode: jnp.sum(encode(p, x) * cot)
    cases = {"forward": encode, "forward_backward": jax.value_and_grad(loss)}
    for case, fn in cases.items():
      row = {"bench": "hashgrid_layout", "variant": name, "case": case, "points": args.points}
      row.update(xla_flags=args.xla_flags, **run_info(args.repeats))
      row.update(measure(fn, (params, x), args.repeats, 1, None))
      out = jax.jit(fn)(params, x)
      out = out if case == "forward" else grad_to_tables(out[1])
      out = out["tables"] if isinstance(out, dict) else out
      reference.setdefault(case, out)
      row["max_abs_diff_vs_current"] = float(jnp.max(jnp.abs(out - reference[case])))
      row["bit_identical_to_current"] = bool(jnp.array_equal(out, reference[case]))
      row["memory"] = {k: row["memory"][k] for k in ("arguments", "outputs", "temp")}
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
