"""PyTorch state dicts of diffusers / transformers models -> Flax param trees.

Works on numpy arrays (as `safetensors.numpy.load_file` returns them), never on
torch tensors, and is driven by the target tree (`jax.eval_shape` of the Flax
module's init), so every weight lands exactly once on a key that exists:

  - names: "down_blocks.0.attentions.1.to_out.0.weight" becomes
    ("down_blocks_0", "attentions_1", "to_out_0", ...) for diffusers models
    (`join_indices=True`); transformers' Flax CLIP keeps list indices as their
    own level ("layers.3.mlp" -> ("layers", "3", "mlp")).
  - leaves: "weight" becomes "kernel" (convolutions OIHW -> HWIO, linear layers
    [out, in] -> [in, out]; a 1x1 convolution stored for a linear layer, as in
    old VAE checkpoints, is squeezed), "scale" (GroupNorm / LayerNorm) or
    "embedding" (nn.Embed), whichever the target has; "bias" stays "bias".
  - the VAE attention block is called query/key/value/proj_attn in Flax and
    to_q/to_k/to_v/to_out.0 in current PyTorch checkpoints (the UNet's Flax
    attention keeps the to_* names); either spelling is accepted.

Anything that does not fit (a target key nobody filled, a weight with no
target, a shape that disagrees) raises one ValueError listing all of them.
"""

from collections.abc import Mapping
import re
from typing import Any

from flax.traverse_util import flatten_dict, unflatten_dict
import numpy as np

# Flax name <-> PyTorch name of the VAE attention projections.
_ATTENTION_ALIASES = {
  "to_q": "query",
  "to_k": "key",
  "to_v": "value",
  "to_out_0": "proj_attn",
  "query": "to_q",
  "key": "to_k",
  "value": "to_v",
  "proj_attn": "to_out_0",
}
# Buffers some checkpoints store next to the weights (CLIP's position ids).
_IGNORED_SUFFIXES = ("position_ids",)
# How many keys of each kind an error message lists.
_MAX_LISTED = 12
_INDEXED = re.compile(r"(\w+)\.(\d+)(?=\.|$)")


def flax_key(torch_name: str, join_indices: bool) -> tuple[str, ...]:
  """Splits a PyTorch parameter name into Flax path components.

  Args:
    torch_name: e.g. "down_blocks.0.resnets.1.conv1.weight".
    join_indices: True for diffusers' Flax models ("down_blocks.0" ->
      "down_blocks_0"), False for transformers' ("layers.0" -> "layers", "0").

  Returns:
    The path, last component still the PyTorch leaf name ("weight", "bias").
  """
  if join_indices:
    torch_name = _INDEXED.sub(r"\1_\2", torch_name)
  return tuple(torch_name.split("."))


def _to_kernel(array: np.ndarray, target_ndim: int) -> np.ndarray:
  """A PyTorch weight in Flax kernel layout: [out, in, kh, kw] -> [kh, kw, in, out],
  [out, in] -> [in, out], [out, in, 1, 1] -> [in, out] for a 2-D target."""
  if array.ndim == 4 and target_ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 4 and target_ndim == 2 and array.shape[2:] == (1, 1):
    return np.transpose(array[:, :, 0, 0])
  if array.ndim == 2:
    return np.transpose(array)
  return array  # Left as is; the shape check reports it.


def _listing(title: str, items: list[str]) -> str:
  shown = "\n    ".join(items[:_MAX_LISTED])
  more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {len(items)} {title}:\n    {shown}{more}"


def _raise_mismatch(
  what: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]
) -> None:
  """Raises one ValueError listing every mismatch, if there is any."""
  if not (missing or unexpected or wrong_shape):
    return
  message = f"{what}: the weights do not fit the model built from its config."
  if missing:
    message += _listing("missing (model parameters with no weight)", missing)
  if unexpected:
    message += _listing("unexpected (weights with no model parameter)", unexpected)
  if wrong_shape:
    message += _listing("with the wrong shape", wrong_shape)
  raise ValueError(message)


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], target: Any, *, join_indices: bool, what: str
) -> dict:
  """Converts a PyTorch state dict to the Flax param tree shaped like `target`.

  Args:
    state_dict: PyTorch parameter name -> numpy array (any float dtype).
    target: the Flax param tree to fill (arrays or jax.ShapeDtypeStruct).
    join_indices: see `flax_key` (True for diffusers, False for transformers).
    what: names the weights in error messages (e.g. the file path).

  Returns:
    Nested dict with the keys of `target`, numpy arrays in Flax layout and
    their stored dtype.

  Raises:
    ValueError: listing missing, unexpected and wrong-shape keys.
  """
  target_flat = flatten_dict(dict(target))
  modules = {key[:-1] for key in target_flat}
  out, unexpected, wrong_shape = {}, [], []
  for name, array in state_dict.items():
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    path = flax_key(name, join_indices)
    module, leaf = path[:-1], path[-1]
    if module not in modules and module and module[-1] in _ATTENTION_ALIASES:
      module = module[:-1] + (_ATTENTION_ALIASES[module[-1]],)
    if leaf == "weight":
      leaf = next(
        (n for n in ("kernel", "scale", "embedding") if module + (n,) in target_flat), leaf
      )
    key = module + (leaf,)
    if key not in target_flat or key in out:
      unexpected.append(name)
      continue
    expected = tuple(target_flat[key].shape)
    array = np.asarray(array)
    if leaf == "kernel":
      array = _to_kernel(array, len(expected))
    if array.shape != expected:
      wrong_shape.append(f"{name} -> {'/'.join(key)}: {array.shape}, expected {expected}")
    out[key] = array
  missing = ["/".join(k) for k in target_flat if k not in out]
  _raise_mismatch(what, missing, unexpected, wrong_shape)
  return unflatten_dict(out)


def check_tree(params: Any, target: Any, *, what: str) -> None:
  """Checks that a Flax param tree (e.g. from msgpack) has target's keys and shapes.

  Args:
    params: nested dict of arrays.
    target: the tree the model expects (arrays or jax.ShapeDtypeStruct).
    what: names the weights in error messages.

  Raises:
    ValueError: listing missing, unexpected and wrong-shape keys.
  """
  if not isinstance(params, Mapping):
    raise ValueError(f"{what}: expected a nested dict of parameters, got {type(params).__name__}")
  flat = flatten_dict(dict(params))
  target_flat = flatten_dict(dict(target))
  missing = ["/".join(k) for k in target_flat if k not in flat]
  unexpected = ["/".join(k) for k in flat if k not in target_flat]
  wrong_shape = [
    f"{'/'.join(k)}: {tuple(np.shape(v))}, expected {tuple(target_flat[k].shape)}"
    for k, v in flat.items()
    if k in target_flat and tuple(np.shape(v)) != tuple(target_flat[k].shape)
  ]
  _raise_mismatch(what, missing, unexpected, wrong_shape)
