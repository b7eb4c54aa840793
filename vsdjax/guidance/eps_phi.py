"""eps_phi: VSD's camera-conditioned noise predictor (LoRA on a Flax UNet).

ProlificDreamer estimates the score of the current particles' renders with a
second copy of the diffusion UNet, eps_phi(x_t, t, c, y): the pretrained UNet
(diffusers' `FlaxUNet2DConditionModel`) with LoRA on every attention projection
(see `vsdjax.lora`) and a camera MLP

    cam_emb = linear_2(silu(linear_1(flatten(c2w))))    16 -> H -> D

whose output is ADDED to the UNet's timestep embedding (what diffusers'
PyTorch UNet calls a class embedding). D = 4 * block_out_channels[0] is the
time-embedding dim (1280 for SD) and H defaults to D. The Flax UNet has no
class-embedding input, so the addition is made with `flax.linen.intercept_methods`
on the `__call__` of its `time_embedding` submodule; diffusers' code is used
unchanged.

Conventions:
  * The camera is the flattened row-major 4x4 camera-to-world matrix, [B, 16].
    A zero camera means "no camera": the MLP still runs on zeros (giving the
    learned constant linear_2(silu(b_1)) + b_2), which is the unconditional
    branch that the 10% camera dropout of `loss` trains.
  * The trainable pytree is {'lora': ..., 'camera': ...} in "lora" mode (the
    base UNet parameters stay frozen and are passed separately, with no
    optimizer state) or {'unet': ..., 'camera': ...} in "full" mode (every UNet
    parameter trains; used for a tiny from-scratch UNet with the analytic prior;
    `base_params` only seeds `init` and is otherwise unused).
  * The camera MLP's last layer starts at zero and LoRA's B starts at zero, so at
    `init` eps_phi equals the base model exactly, for any camera.
  * Images are NCHW as in diffusers: x_t [B, C, h, w], encoder states [B, L, D_text].
"""

from collections.abc import Mapping
import contextlib
import dataclasses

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsdjax import checks, mlp
from vsdjax.guidance import lora as lora_lib
from vsdjax.prior import schedule, stable_diffusion

CAMERA_DIM = 16  # Flattened 4x4 camera-to-world matrix.
_MODES = ("lora", "full")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class EpsPhiSpec:
  """Static settings of eps_phi (hashable, so it can be a static jit argument).

  Attributes:
    mode: "lora" (frozen base UNet + LoRA) or "full" (all UNet params train).
    rank: LoRA rank r (ignored in "full" mode).
    alpha: LoRA alpha; the LoRA scale is alpha / rank.
    camera_dropout: probability, per sample, that `loss` replaces the camera by
      zeros.
    camera_hidden: hidden width of the camera MLP; None uses the UNet's
      time-embedding dim.
    attention: the UNet's attention, one of stable_diffusion.ATTENTIONS (see
      stable_diffusion.intercept_attention).
  """

  mode: str = "lora"
  rank: int = 4
  alpha: float = 4.0
  camera_dropout: float = 0.1
  camera_hidden: int | None = None
  attention: str = "fused"

  def __post_init__(self):
    checks.check_fields(
      self,
      mode=checks.choice(*_MODES),
      rank=checks.integer(1),
      alpha=checks.number(),
      camera_dropout=checks.UNIT,
      camera_hidden=checks.optional(checks.integer(1)),
      attention=checks.choice(*stable_diffusion.ATTENTIONS),
    )

  @property
  def lora_scale(self) -> float:
    """alpha / rank."""
    return self.alpha / self.rank


def time_embed_dim(unet_module: nn.Module) -> int:
  """The UNet's time-embedding width, 4 * block_out_channels[0] (1280 for SD)."""
  return 4 * unet_module.block_out_channels[0]


def camera_embedding(camera_params: Mapping, camera: jax.Array) -> jax.Array:
  """The camera MLP: [B, 16] flattened camera-to-world matrices -> [B, D]."""
  return mlp.apply(camera_params, camera, activation=nn.silu)


@dataclasses.dataclass(frozen=True, eq=False)
class EpsPhi:
  """eps_phi's static parts in one object (closed over by jit; hashed by identity).

  The arrays stay outside: the base UNet parameters `base_params` (the inside
  of {'params': ...}; frozen, shared with the prior or not, gradients stopped,
  unused in "full" mode) and the `trainable` pytree of `init`.

  Attributes:
    unet: the FlaxUNet2DConditionModel (its config sets the shapes).
    spec: EpsPhiSpec.
    alphas_cumprod: [T] abar_t of the base model's schedule.
    prediction_type: "epsilon" or "v_prediction", what the base model predicts.
  """

  unet: nn.Module
  spec: EpsPhiSpec
  alphas_cumprod: np.ndarray
  prediction_type: str

  def __post_init__(self):
    if self.prediction_type not in _PREDICTION_TYPES:
      raise ValueError(
        f"prediction_type={self.prediction_type!r} is unknown; expected one of {_PREDICTION_TYPES}"
      )
    abar = np.asarray(self.alphas_cumprod, np.float32)
    if abar.ndim != 1:
      raise ValueError(f"alphas_cumprod must be [T], got shape {abar.shape}")
    object.__setattr__(self, "alphas_cumprod", abar)

  @property
  def time_embed_dim(self) -> int:
    """The UNet's time-embedding width, 4 * block_out_channels[0] (1280 for SD)."""
    return 4 * self.unet.block_out_channels[0]

  def init(self, key: jax.Array, base_params: Mapping) -> dict:
    """Initialises the trainable parameters.

    Args:
      key: PRNG key.
      base_params: the base UNet parameters (arrays or ShapeDtypeStructs; in
        "lora" mode only their shapes are read).

    Returns:
      {'lora': lora pytree, 'camera': MLP params} in "lora" mode, or
      {'unet': a float32 copy of base_params, 'camera': MLP params} in "full"
      mode; every leaf is float32, whatever base_params' dtype. The camera MLP
      is {'layer_0': {'w': [16, H], 'b': [H]}, 'layer_1': {'w': [H, D], 'b': [D]}}
      (see `vsdjax.mlp`) with layer_1 all zeros.
    """
    if not isinstance(base_params, Mapping) or "time_embedding" not in base_params:
      raise ValueError(
        "base_params must be the UNet parameter tree (the inside of "
        "{'params': ...}, with a 'time_embedding' entry)"
      )
    d = self.time_embed_dim
    d_params = base_params["time_embedding"]["linear_2"]["kernel"].shape[-1]
    if d_params != d:
      raise ValueError(
        f"base_params: time embedding has width {d_params}, but the UNet expects {d}"
      )
    spec = self.spec
    hidden = d if spec.camera_hidden is None else spec.camera_hidden
    k_lora, k_cam = jax.random.split(key)
    camera = mlp.init(k_cam, (CAMERA_DIM, hidden, d))
    camera["layer_1"] = jax.tree.map(jnp.zeros_like, camera["layer_1"])
    if spec.mode == "lora":
      return {"lora": lora_lib.init(k_lora, base_params, spec.rank), "camera": camera}
    unet = jax.tree.map(
      lambda w: jnp.array(w, jnp.float32, copy=True), flax.core.unfreeze(base_params)
    )
    return {"unet": unet, "camera": camera}

  def _check_trainable(self, trainable: Mapping) -> None:
    """Raises ValueError unless `trainable` has the keys of `init`'s pytree in this mode."""
    mode = self.spec.mode
    expected = {"lora": {"lora", "camera"}, "full": {"unet", "camera"}}[mode]
    if not isinstance(trainable, Mapping) or set(trainable) != expected:
      got = sorted(trainable) if isinstance(trainable, Mapping) else type(trainable).__name__
      raise ValueError(f"trainable must have keys {sorted(expected)} in mode {mode!r}, got {got}")

  def _check_inputs(self, x_t, t, emb, camera) -> None:
    """Raises ValueError on inputs whose shapes eps_phi cannot take."""
    unet = self.unet
    if x_t.ndim != 4 or x_t.shape[1] != unet.in_channels:
      raise ValueError(f"x_t must be [B, {unet.in_channels}, h, w], got {x_t.shape}")
    batch, factor = x_t.shape[0], 2 ** (len(unet.block_out_channels) - 1)
    if x_t.shape[2] % factor or x_t.shape[3] % factor:
      raise ValueError(f"x_t: h and w must be multiples of {factor}, got {x_t.shape[2:]}")
    if t.shape != (batch,):
      raise ValueError(f"t must have shape [{batch}], got {t.shape}")
    if emb.ndim != 3 or emb.shape[0] != batch or emb.shape[2] != unet.cross_attention_dim:
      raise ValueError(f"emb must be [{batch}, L, {unet.cross_attention_dim}], got {emb.shape}")
    if camera.shape != (batch, CAMERA_DIM):
      raise ValueError(f"camera must have shape [{batch}, {CAMERA_DIM}], got {camera.shape}")

  def apply(self, base_params, trainable, x_t, t, emb, camera, rows=None) -> jax.Array:
    """Runs eps_phi.

    In "lora" mode the base kernels stay as they are and the adapters add their
    update to the projections' outputs (`lora.intercept`); `rows` then lets one
    call hold rows of the base model alone, e.g. the prior's CFG pair beside
    eps_phi's own prediction when both share a UNet.

    Args:
      base_params: frozen base UNet parameters.
      trainable: from `init`.
      x_t: [B, C, h, w] noisy inputs.
      t: [B] integer timesteps.
      emb: [B, L, D_text] text encoder states.
      camera: [B, 16] flattened camera-to-world matrices (zeros: no camera).
      rows: optional [B] 0 / 1: 1 runs eps_phi on that row, 0 the base model
        (no LoRA, no camera embedding; "lora" mode only); None: eps_phi on all.

    Returns:
      [B, C, h, w] the raw model output (eps or v, as the base model predicts).
    """
    x_t, t, emb, camera = (jnp.asarray(a) for a in (x_t, t, emb, camera))
    self._check_inputs(x_t, t, emb, camera)
    self._check_trainable(trainable)
    if rows is not None:
      rows = jnp.asarray(rows, jnp.float32)
      if self.spec.mode != "lora" or rows.shape != x_t.shape[:1]:
        raise ValueError(
          f"rows must be [{x_t.shape[0]}] and needs mode 'lora', got shape {rows.shape} "
          f"in mode {self.spec.mode!r}"
        )
    cam_emb = camera_embedding(trainable["camera"], camera)  # [B, D]
    if rows is not None:
      cam_emb = lora_lib.weigh_rows(cam_emb, rows)
    unet_type = type(self.unet)
    calls = []

    def add_camera(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (
        context.method_name == "__call__"
        and context.module.name == "time_embedding"
        and isinstance(context.module.parent, unet_type)
      ):
        calls.append(context.module.path)
        out = out + cam_emb.astype(out.dtype)  # [B, D]
      return out

    if self.spec.mode == "full":
      params, adapters = trainable["unet"], contextlib.nullcontext()
    else:
      params = jax.lax.stop_gradient(base_params)
      adapters = lora_lib.intercept(trainable["lora"], self.spec.lora_scale, rows)
    with (
      stable_diffusion.intercept_attention(self.spec.attention),
      nn.intercept_methods(stable_diffusion.exact_geglu),  # as the prior's UNet
      nn.intercept_methods(add_camera),
      adapters,
    ):
      out = self.unet.apply({"params": params}, x_t, t, emb, return_dict=False)[0]
    if len(calls) != 1:  # Guards against a diffusers change of the module tree.
      raise ValueError(
        f"unet: expected one call of its time_embedding, saw {len(calls)}; "
        "the camera embedding was not added once"
      )
    return out  # [B, C, h, w]

  def predict_eps(self, base_params, trainable, x_t, t, emb, camera, rows=None) -> jax.Array:
    """eps [B, C, h, w]: `apply`'s output, converted from v if the base predicts v."""
    out = self.apply(base_params, trainable, x_t, t, emb, camera, rows)
    a_t, s_t = schedule.coefficients(self.alphas_cumprod, t)  # [B], [B]
    return schedule.eps_from_output(
      out.astype(jnp.float32), jnp.asarray(x_t, jnp.float32), a_t, s_t, self.prediction_type
    )

  def predict_eps_with_base(
    self, base_params, trainable, x_t, t, emb, camera, base_embs
  ) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The base model's eps under k other conditionings and eps_phi's, in one UNet call.

    Where eps_phi's base is the prior's own UNet, the prior's CFG pair (the base
    model under the prompt and under "") and eps_phi's prediction at the same
    x_t and t are one call of batch (k + 1) B instead of two (2B and B): the
    weights are read once and the device gets a fuller batch. The base rows run
    without LoRA and camera embedding (`apply`'s rows); "lora" mode only.

    Args:
      base_params, trainable, x_t, t, emb, camera: as `predict_eps`.
      base_embs: k [B, L, D_text] conditionings of the base model.

    Returns:
      (k [B, C, h, w] eps of the base model, one per base_embs; eps_phi's [B, C, h, w]).
    """
    k = len(base_embs)
    x_t, t, camera = jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(camera)
    eps = self.predict_eps(
      base_params,
      trainable,
      jnp.concatenate([x_t] * (k + 1)),
      jnp.concatenate([t] * (k + 1)),
      jnp.concatenate([jnp.asarray(e) for e in base_embs] + [jnp.asarray(emb)]),
      jnp.concatenate([jnp.zeros_like(camera)] * k + [camera]),
      rows=jnp.repeat(jnp.arange(k + 1) == k, x_t.shape[0]),
    )  # [(k + 1) B, C, h, w]
    *base, phi = jnp.split(eps, k + 1)
    return tuple(base), phi

  def loss(self, base_params, trainable, x0, emb, camera, key) -> tuple[jax.Array, dict]:
    """The diffusion loss that fits eps_phi to the current renders.

    For each sample: t' ~ U{0..T-1}, eps' ~ N(0, I), x_t' = a_t' x0 + s_t' eps';
    the camera is replaced by zeros with probability `spec.camera_dropout`; the
    target is eps' ("epsilon") or v' = a_t' eps' - s_t' x0 ("v_prediction").

    Args:
      base_params, trainable: as `apply`.
      x0: [B, C, h, w] clean samples (renders or latents; gradients are stopped).
      emb: [B, L, D_text] text encoder states.
      camera: [B, 16] flattened camera-to-world matrices.
      key: PRNG key.

    Returns:
      (loss, aux): the mean squared error over all elements (scalar float32), and
      {'t': [B] int32 timesteps, 'noise': [B, C, h, w] eps',
       'camera_dropped': [B] bool}.
    """
    x0 = jax.lax.stop_gradient(jnp.asarray(x0, jnp.float32))  # [B, C, h, w]
    camera = jnp.asarray(camera)
    if x0.ndim != 4 or camera.shape != (x0.shape[0], CAMERA_DIM):
      raise ValueError(
        f"x0 must be [B, C, h, w] and camera [B, {CAMERA_DIM}], got {x0.shape} and {camera.shape}"
      )
    batch = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (batch,), 0, self.alphas_cumprod.shape[0])  # [B]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)  # [B, C, h, w]
    dropped = jax.random.bernoulli(k_drop, self.spec.camera_dropout, (batch,))  # [B]
    camera = jnp.where(dropped[:, None], jnp.zeros_like(camera), camera)  # [B, 16]
    a_t, s_t = schedule.coefficients(self.alphas_cumprod, t)  # [B], [B]
    x_t = schedule.add_noise(x0, eps, a_t, s_t)  # [B, C, h, w]
    out = self.apply(base_params, trainable, x_t, t, emb, camera)
    if self.prediction_type == "epsilon":
      target = eps
    else:
      target = schedule.v_target(x0, eps, a_t, s_t)
    mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target))
    return mse, {"t": t, "noise": eps, "camera_dropped": dropped}
