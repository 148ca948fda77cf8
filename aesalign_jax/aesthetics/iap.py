"""IAP: the LAION improved aesthetic predictor, an MLP head on L2-normalised CLIP image embeddings.

Architecture (christophschuhmann/improved-aesthetic-predictor, simple_inference.py):
  Linear(D, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1)
  Linear(64, 16) Linear(16, 1)
with D the CLIP embedding width (768 for ViT-L/14). The published weights
(sac+logos+ava1-l14-linearMSE.pth) have no activations: the ReLUs are commented out, so the
head is a (factored) linear map. A "reluMSE" variant puts a ReLU after each of the first four
linears; `activation="relu"` selects it. Outputs are ratings on the training data's scale
(AVA-like 1..10 for the published weights).

Parameters are a flat dict of jax arrays, named `dense_{i}.kernel` ([in, out]) and
`dense_{i}.bias` ([out]) for i = 0..4; convert_laion_weights.py maps the torch names
(`layers.{0,2,4,6,7}.weight`, [out, in]) to these. Files: safetensors (activation in the
metadata) or npz (activation under the key "activation"), never pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aesalign_jax.aesthetics import base

HIDDEN = (1024, 128, 64, 16, 1)  # output width of dense_0..dense_4
DROPOUT = (0.2, 0.2, 0.1, 0.0)  # dropout rate after dense_0..dense_3 (training only)
ACTIVATIONS = ("none", "relu")

Params = dict[str, jax.Array]


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the IAP scorer (config section aesthetics.iap)."""
  c = ml_collections.ConfigDict()
  # safetensors or npz weights (e.g. from convert_laion_weights.py or `fit`); "" = none yet.
  c.weights = ""
  # CLIP image embedding width the head reads (768 for ViT-L/14).
  c.embed_dim = 768
  # The CLIP (a Hugging Face folder) whose image embeddings the head reads when mining;
  # "" = the model being aligned, whose embeddings must then be embed_dim wide. The LAION
  # head reads OpenAI ViT-L/14 embeddings: name a ViT-L/14 folder to align a ViT-B model.
  c.clip_folder = ""
  # "none" for the published linearMSE weights, "relu" for the reluMSE variant. A weights
  # file records its own activation, which must agree.
  c.activation = "none"
  # Training (`fit`) on (embedding, rating) pairs.
  c.steps = 2000
  c.batch_size = 256
  c.learning_rate = 1e-3  # Adam, as in the LAION trainer
  c.weight_decay = 0.0
  c.seed = 0
  return c


def param_shapes(embed_dim: int) -> dict[str, tuple[int, ...]]:
  """Every parameter's name and shape for a head reading `embed_dim`-wide embeddings."""
  shapes, fan_in = {}, embed_dim
  for i, width in enumerate(HIDDEN):
    shapes[f"dense_{i}.kernel"] = (fan_in, width)
    shapes[f"dense_{i}.bias"] = (width,)
    fan_in = width
  return shapes


def init_params(seed: int = 0, embed_dim: int = 768) -> Params:
  """Random parameters, initialised like torch.nn.Linear (uniform +-1/sqrt(fan_in)).

  Drawn with numpy on the host: a handful of arrays, and no XLA compile for them.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in param_shapes(embed_dim).items():
    fan_in = param_shapes(embed_dim)[name.replace(".bias", ".kernel")][0]
    bound = 1.0 / np.sqrt(fan_in)
    params[name] = jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))
  return params


def apply(params: Params, embeddings: jax.Array, *, activation: str = "none",
          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Predicted ratings [N] for embeddings [N, D]; dropout only when `dropout_rng` is given."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"IAP activation must be one of {ACTIVATIONS}, got {activation!r}")
  x = embeddings
  for i in range(len(HIDDEN)):
    x = x @ params[f"dense_{i}.kernel"] + params[f"dense_{i}.bias"]
    if i < len(HIDDEN) - 1:
      if activation == "relu":
        x = jax.nn.relu(x)
      if dropout_rng is not None and DROPOUT[i] > 0:
        keep = 1.0 - DROPOUT[i]
        mask = jax.random.bernoulli(jax.random.fold_in(dropout_rng, i), keep, x.shape)
        x = jnp.where(mask, x / keep, 0.0)
  return x[:, 0]


# ---------------------------------------------------------------------------------------------
# Files.

def save_params(path: str | os.PathLike, params: Params, *, activation: str = "none") -> None:
  """Writes params to .safetensors or .npz (chosen by the suffix), with the activation."""
  path = Path(path)
  if activation not in ACTIVATIONS:
    raise ValueError(f"IAP activation must be one of {ACTIVATIONS}, got {activation!r}")
  arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(arrays, str(path), metadata={"format": "aesalign-iap", "activation": activation})
  elif path.suffix == ".npz":
    with open(path, "wb") as f:
      np.savez(f, activation=np.array(activation), **arrays)
  else:
    raise ValueError(f"{path}: IAP weights must be .safetensors or .npz")


def load_params(path: str | os.PathLike, *,
                embed_dim: int | None = None) -> tuple[Params, str]:
  """Reads IAP weights from .safetensors or .npz; returns (params, activation).

  Raises ValueError naming the file and key on a missing or unexpected key or a wrong shape.
  `embed_dim` None takes the width from the file's dense_0.kernel.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"IAP weights file not found: {path}")
  if path.suffix == ".safetensors":
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
      arrays = {k: f.get_tensor(k) for k in f.keys()}
      activation = (f.metadata() or {}).get("activation", "none")
  elif path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    activation = str(arrays.pop("activation", "none"))
  else:
    raise ValueError(f"{path}: IAP weights must be .safetensors or .npz")
  if activation not in ACTIVATIONS:
    raise ValueError(f"{path}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
  if embed_dim is None:
    if "dense_0.kernel" not in arrays or arrays["dense_0.kernel"].ndim != 2:
      raise ValueError(f"{path}: missing key 'dense_0.kernel' (a 2-D [D, 1024] array)")
    embed_dim = int(arrays["dense_0.kernel"].shape[0])
  expected = param_shapes(embed_dim)
  for name, shape in expected.items():
    if name not in arrays:
      raise ValueError(f"{path}: missing key {name!r} (expected shape {shape})")
    if tuple(arrays[name].shape) != shape:
      raise ValueError(f"{path}: key {name!r} has shape {tuple(arrays[name].shape)}, "
                       f"expected {shape} (embed_dim {embed_dim})")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise ValueError(f"{path}: unexpected keys {extra}; expected {sorted(expected)}")
  return {k: jnp.asarray(arrays[k], jnp.float32) for k in expected}, activation


# ---------------------------------------------------------------------------------------------
# Training.

def fit(embeddings: np.ndarray, ratings: np.ndarray, *, params: Params | None = None,
        activation: str = "none", steps: int = 2000, batch_size: int = 256,
        learning_rate: float = 1e-3, weight_decay: float = 0.0,
        seed: int = 0) -> tuple[Params, np.ndarray]:
  """Trains the head with MSE on (embedding, rating) pairs (Adam/AdamW, dropout on).

  Args:
    embeddings: [N, D] L2-normalised image embeddings.
    ratings: [N] targets.
    params: starting parameters (e.g. the published weights); None = fresh init from `seed`.
    activation: "none" (the published linear head) or "relu".
    steps, batch_size, learning_rate, weight_decay, seed: the usual; batches are drawn
      without replacement within each pass over the data.
  Returns:
    (trained params, per-step training loss as float32 [steps]).
  """
  x = jnp.asarray(embeddings, jnp.float32)
  y = jnp.asarray(ratings, jnp.float32)
  if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
    raise ValueError(f"fit: need embeddings [N, D] and ratings [N], got {x.shape} and {y.shape}")
  if steps < 1:
    raise ValueError(f"fit: steps must be >= 1, got {steps}")
  dropout_rng = jax.random.key(seed)
  if params is None:
    params = init_params(seed, x.shape[1])
  elif params["dense_0.kernel"].shape[0] != x.shape[1]:
    raise ValueError(f"fit: params read {params['dense_0.kernel'].shape[0]}-wide embeddings, "
                     f"got {x.shape[1]}-wide ones")
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = jax.jit(optimizer.init)(params)

  # Batch indices for every step, drawn on the host: each pass over the data is a fresh
  # permutation cut into full batches.
  n = x.shape[0]
  batch_size = min(batch_size, n)
  per_pass = n // batch_size
  perm_rng = np.random.default_rng(seed)
  passes = [perm_rng.permutation(n)[:per_pass * batch_size].reshape(per_pass, batch_size)
            for _ in range(-(-steps // per_pass))]
  indices = np.concatenate(passes)[:steps].astype(np.int32)

  def loss_fn(p, xb, yb, drop_rng):
    return jnp.mean((apply(p, xb, activation=activation, dropout_rng=drop_rng) - yb) ** 2)

  # Steps run in jitted chunks of lax.scan: one dispatch per chunk, and the data are
  # arguments, not closed over, so they are not baked into the compiled program.
  @jax.jit
  def run_chunk(p, state, x, y, chunk_indices, step0):
    def one_step(carry, inputs):
      p, state = carry
      t, idx = inputs
      loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx],
                                                jax.random.fold_in(dropout_rng, t))
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), loss
    steps_here = jnp.arange(chunk_indices.shape[0]) + step0
    (p, state), losses = jax.lax.scan(one_step, (p, state), (steps_here, chunk_indices))
    return p, state, losses

  chunk, losses = 500, []
  for start in range(0, steps, chunk):
    params, opt_state, chunk_losses = run_chunk(params, opt_state, x, y,
                                                indices[start:start + chunk], start)
    losses.append(chunk_losses)
  return params, np.asarray(jnp.concatenate(losses), np.float32)


# ---------------------------------------------------------------------------------------------
# Scorer.

class IAPScorer:
  """Scorer: images -> `embed_fn` (L2-normalised CLIP embeddings) -> IAP head -> rating."""

  def __init__(self, embed_fn: Callable[[np.ndarray], np.ndarray], params: Params, *,
               activation: str = "none", name: str = "iap"):
    if activation not in ACTIVATIONS:
      raise ValueError(f"IAP activation must be one of {ACTIVATIONS}, got {activation!r}")
    self.embed_fn = embed_fn
    self.params = params
    self.activation = activation
    self.name = name
    self._predict = jax.jit(lambda p, e: apply(p, e, activation=activation))

  @classmethod
  def from_file(cls, path: str | os.PathLike, embed_fn: Callable[[np.ndarray], np.ndarray],
                *, embed_dim: int | None = None, name: str = "iap") -> "IAPScorer":
    """A scorer with weights (and activation) from a .safetensors / .npz file."""
    params, activation = load_params(path, embed_dim=embed_dim)
    return cls(embed_fn, params, activation=activation, name=name)

  def predict(self, embeddings: np.ndarray) -> np.ndarray:
    """Ratings [N] for L2-normalised embeddings [N, D]."""
    emb = np.asarray(embeddings, np.float32)
    width = self.params["dense_0.kernel"].shape[0]
    if emb.ndim != 2 or emb.shape[1] != width:
      raise ValueError(f"{self.name}: embeddings must be [N, {width}], got {emb.shape}")
    return np.asarray(self._predict(self.params, emb), np.float64)

  def score(self, images: np.ndarray) -> np.ndarray:
    images = base.check_images(images, self.name)
    return base.check_scores(self.predict(self.embed_fn(images)), len(images), self.name)
