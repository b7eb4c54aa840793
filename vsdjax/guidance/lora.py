"""Low-rank adapters (LoRA) for the attention projections of a Flax UNet.

LoRA (Hu et al., 2021) replaces a frozen Dense kernel W [in, out] by

    W' = W + scale * A @ B,    A [in, r], B [r, out],    scale = alpha / r,

and trains only A and B. B starts at zero, so the adapted model starts equal to
the base model. Two ways to run it, equal up to rounding:

  * `intercept` (what eps_phi runs): the base kernel stays as it is and each
    adapted Dense adds scale * (x @ A) @ B to its output, in float32. The
    gradient w.r.t. A and B then needs no [in, out] product of the frozen
    kernel's shape (about 4 % of an SD LoRA update's FLOPs), a bfloat16 base is
    not rounded around a small update, and some rows of a batch can run the
    base model alone (`rows`), so one UNet call serves the base and the
    adapted model.
  * `merge`: a parameter tree with W + scale * A @ B, for exporting merged
    weights, and the tests' reference.

The LoRA pytree mirrors the base parameter tree: it holds, at the path of each
targeted Dense module, a dict {'a': [in, r], 'b': [r, out]}, e.g.

    {'down_blocks_0': {'attentions_0': {'transformer_blocks_0': {'attn1': {
        'to_q': {'a': [320, 4], 'b': [4, 320]}, ...}}}}, ...}

Targets are named by diffusers' FlaxAttention attribute names ("query", "key",
"value", "proj_attn"); in the parameter tree these Dense layers are stored under
their PyTorch-compatible names ("to_q", "to_k", "to_v", "to_out_0"), which are
accepted too. Only kernels are adapted; the bias of "to_out_0" stays frozen.
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# FlaxAttention attribute name -> name of its Dense in the parameter tree.
PARAM_NAMES = {
  "query": "to_q",
  "key": "to_k",
  "value": "to_v",
  "proj_attn": "to_out_0",
}
DEFAULT_TARGETS = ("query", "key", "value", "proj_attn")


def _param_names(targets: Sequence[str]) -> frozenset[str]:
  """Maps target names (attribute or parameter names) to parameter names."""
  if isinstance(targets, str) or not targets:
    raise ValueError(f"targets must be a non-empty sequence of names, got {targets!r}")
  known = set(PARAM_NAMES) | set(PARAM_NAMES.values())
  unknown = [t for t in targets if t not in known]
  if unknown:
    raise ValueError(f"targets: unknown names {unknown}; expected some of {sorted(known)}")
  return frozenset(PARAM_NAMES.get(t, t) for t in targets)


def _target_kernels(params: Mapping, names: frozenset[str], path=()):
  """Yields (path, kernel) for every Dense module named in `names`."""
  for k, v in params.items():
    if not isinstance(v, Mapping):
      continue
    if k in names and "kernel" in v and getattr(v["kernel"], "ndim", None) == 2:
      yield path + (k,), v["kernel"]
    else:
      yield from _target_kernels(v, names, path + (k,))


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]]...[path[-1]] = value, creating dicts on the way."""
  node = tree
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value


def _adapters(lora: Mapping, path=()):
  """Yields (path, {'a', 'b'}) for every adapter of a LoRA pytree."""
  if not isinstance(lora, Mapping):
    raise ValueError(f"lora: leaf at {'/'.join(path)} is not inside an {{'a', 'b'}} pair")
  if set(lora) == {"a", "b"} and not isinstance(lora["a"], Mapping):
    yield path, lora
    return
  for k, v in lora.items():
    yield from _adapters(v, path + (k,))


def paths(lora: Mapping) -> list[tuple[str, ...]]:
  """Paths of the adapted Dense modules, e.g. ('mid_block', ..., 'attn1', 'to_q').

  Args:
    lora: a LoRA pytree as returned by `init`.

  Returns:
    The paths (tuples of keys) of every {'a', 'b'} pair, in tree order.
  """
  return [path for path, _ in _adapters(lora)]


def init(
  key: jax.Array, unet_params: Mapping, rank: int, targets: Sequence[str] = DEFAULT_TARGETS
) -> dict:
  """Initialises LoRA factors for every targeted Dense kernel of a UNet.

  A ~ N(0, (1 / rank)^2) as diffusers' LoRALinearLayer, B = 0, so `merge` returns the base
  kernels at initialisation. Factors are float32 whatever the base kernel's
  dtype (trainable parameters and their optimiser states stay float32 over a
  bfloat16 UNet; `merge` casts the update to the kernel's dtype).

  Args:
    key: PRNG key.
    unet_params: the UNet parameter tree (the inside of {'params': ...}); only
      shapes and dtypes are read, so a `jax.eval_shape` result also works.
    rank: LoRA rank r >= 1.
    targets: Dense modules to adapt, by FlaxAttention attribute name
      ("query", "key", "value", "proj_attn") or parameter name ("to_q", ...).

  Returns:
    Nested dict mirroring the paths of the targeted modules, with
    {'a': [in, r], 'b': [r, out]} at each.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if not isinstance(unet_params, Mapping):
    raise ValueError(f"unet_params must be a nested mapping, got {type(unet_params)}")
  found = list(_target_kernels(unet_params, _param_names(targets)))
  if not found:
    raise ValueError(f"unet_params: no Dense kernel matches targets {tuple(targets)}")
  factors = _draw_factors(key, tuple(tuple(k.shape) for _, k in found), rank)
  lora = {}
  for (path, _), (a, b) in zip(found, factors):
    _set_path(lora, path, {"a": a, "b": b})
  return lora


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_factors(key: jax.Array, shapes: tuple, rank: int) -> list[tuple[jax.Array, jax.Array]]:
  """A ~ N(0, 1 / rank^2) [in, r] and B = 0 [r, out], float32, for each (in, out)."""
  sizes = [d_in * rank for d_in, _ in shapes]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32) / rank  # One draw for all A.
  factors, start = [], 0
  for size, (d_in, d_out) in zip(sizes, shapes):
    a = flat[start : start + size].reshape(d_in, rank)  # [in, r]
    factors.append((a, jnp.zeros((rank, d_out), jnp.float32)))  # [r, out]
    start += size
  return factors


def merge(base_params: Mapping, lora: Mapping, scale) -> dict:
  """Returns the base parameters with W + scale * A @ B on every adapted kernel.

  Pure: nothing is modified in place. Subtrees and leaves without an adapter
  are the same objects as in `base_params`; only the dicts on the way to an
  adapted kernel are new. Works under jit and grad (w.r.t. lora and scale).

  Args:
    base_params: UNet parameter tree (the inside of {'params': ...}).
    lora: LoRA pytree from `init` (paths must exist in base_params).
    scale: scalar, alpha / rank.

  Returns:
    The merged parameter tree (a nested dict).
  """
  if not isinstance(base_params, Mapping):
    raise ValueError(f"base_params must be a nested mapping, got {type(base_params)}")
  if isinstance(scale, (int, float)) and not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  if jnp.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}")
  merged = dict(base_params)
  for path, adapter in _adapters(lora):
    node, copy = base_params, merged
    for depth, k in enumerate(path):
      if not isinstance(node, Mapping) or k not in node:
        raise ValueError(
          f"lora: path {'/'.join(path)} is not in base_params (missing {k!r} at depth {depth})"
        )
      node = node[k]
      if copy[k] is node:  # First adapter under this dict: copy it once.
        copy[k] = dict(node)
      copy = copy[k]
    if "kernel" not in node:
      raise ValueError(f"base_params: {'/'.join(path)} has no 'kernel'")
    w, a, b = node["kernel"], adapter["a"], adapter["b"]
    if (
      w.ndim != 2
      or a.ndim != 2
      or b.ndim != 2
      or a.shape[0] != w.shape[0]
      or b.shape[1] != w.shape[1]
      or a.shape[1] != b.shape[0]
    ):
      raise ValueError(
        f"lora: shapes at {'/'.join(path)} do not fit: kernel {w.shape}, "
        f"a {a.shape}, b {b.shape}; expected a [in, r], b [r, out]"
      )
    delta = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))  # [in, out]
    copy["kernel"] = w + delta.astype(w.dtype)
  return merged


def weigh_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, ...] with row b scaled by rows[b] ([B]); rows of weight 0 are exact zeros,
  even where x is not finite (0 * inf would be NaN)."""
  weight = rows.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(weight != 0, x * weight, 0.0)


@contextlib.contextmanager
def intercept(lora: Mapping, scale, rows: jax.Array | None = None) -> Iterator[None]:
  """A context in which the adapted Dense modules add their low-rank update.

  Inside it, a flax Dense whose module path is an adapter's path in `lora`
  returns y = x W + b + scale * (x A) B (rows of x: [B, ..., in] -> [B, ..., out]);
  every other module runs unchanged. The update is computed in float32 and cast
  to y's dtype. Wrap the UNet's `apply` in it (it nests with other method
  interceptors); module paths are taken from the top module applied, as in its
  parameter tree. Works under jit, vmap and grad (w.r.t. lora, scale, rows) when
  entered inside the traced function: around a call of an already-jitted one, a
  cached program runs as it was traced, with or without the update.

  Args:
    lora: LoRA pytree from `init`.
    scale: scalar, alpha / rank.
    rows: optional [B] weights of the update per batch row (1: the adapted model,
      0: the base model alone, even where the update is not finite); None
      applies it to every row.

  Raises:
    ValueError: on leaving the context, if some adapter met no Dense module
      (its path is not in the model that ran).
  """
  adapters = dict(_adapters(lora))  # path -> {'a': [in, r], 'b': [r, out]}
  if jnp.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar, got shape {jnp.shape(scale)}")
  if rows is not None and jnp.ndim(rows) != 1:
    raise ValueError(f"rows must be [B], got shape {jnp.shape(rows)}")
  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    adapter = None
    if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
      adapter = adapters.get(tuple(context.module.path))
    if adapter is None:
      return out
    x = args[0]  # [B, ..., in]
    a, b = adapter["a"], adapter["b"]
    if a.shape[0] != x.shape[-1] or b.shape[1] != out.shape[-1] or a.shape[1] != b.shape[0]:
      raise ValueError(
        f"lora: shapes at {'/'.join(context.module.path)} do not fit: input {x.shape}, "
        f"output {out.shape}, a {a.shape}, b {b.shape}"
      )
    delta = scale * jnp.matmul(jnp.matmul(x.astype(jnp.float32), a), b)  # [B, ..., out]
    if rows is not None:
      if rows.shape[0] != x.shape[0]:
        raise ValueError(f"rows: {rows.shape[0]} weights for a batch of {x.shape[0]}")
      delta = weigh_rows(delta, rows)
    seen.add(tuple(context.module.path))
    return out + delta.astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield
  missing = [path for path in adapters if path not in seen]
  if missing:
    raise ValueError(
      f"lora: {len(missing)} adapters met no Dense module, e.g. {'/'.join(missing[0])}"
    )


def count(lora: Mapping) -> int:
  """Number of trainable scalars in a LoRA pytree (sum of r * (in + out))."""
  paths(lora)  # Validates the structure.
  return sum(math.prod(x.shape) for x in jax.tree.leaves(lora))
